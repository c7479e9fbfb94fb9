// Send-buffer sizing for the sockets an agent writes application bytes into.
//
// A unix stream socket has no receive buffer of its own: the writer's send buffer is the whole queue
// between the two ends. At the default 208 KiB a relay writing 256 KiB blocks fills it with every write,
// and the reader on the other side wakes for each small piece. A deeper queue lets each wakeup move more;
// it costs memory only while bytes wait in it, and the stream's credit window still bounds those bytes.
// The agents ask for it when a write first finds the queue full, so a short exchange pays no system call.
// TCP sockets are left alone: the kernel sizes their buffers to the connection, and a fixed size would
// switch that off.
#pragma once

namespace vbridge {

inline constexpr int kUnixSendBufferBytes = 1 << 20;

// For a unix socket: asks for kUnixSendBufferBytes of send buffer, above net.core.wmem_max where the
// process may (CAP_NET_ADMIN), else up to it. Other sockets are not touched. Best effort: a socket that
// keeps its default still works.
void widen_send_buffer_if_unix(int fd);

}  // namespace vbridge
