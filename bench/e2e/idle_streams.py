#!/usr/bin/env python3
"""Memory of both agents with many idle streams (python3 standard library and tests/integration/fixtures.py).

A fresh agent pair forwards a host unix socket to a small echo server; N clients connect through it, each
sends one byte and reads it back (so every stream is open end to end), then all sit idle. VmRSS and VmHWM of
both agents come from /proc/PID/status, before the streams and with all of them open; the host agent's
status socket confirms the stream count.

    python3 bench/e2e/idle_streams.py --build-dir build [--streams 1000] [--json out.json]
"""

from __future__ import annotations

import os
import resource
import selectors
import socket
import sys
import threading
import time

sys.dont_write_bytecode = True  # no __pycache__ in the source tree
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bridge import Pair, fixtures, tool_arguments, write_json  # noqa: E402


class EchoServer:
    """Echoes on a unix socket from one thread, any number of connections (no thread per connection)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(path)
        self.listener.listen(1024)
        self.listener.setblocking(False)
        self.sel = selectors.DefaultSelector()
        self.sel.register(self.listener, selectors.EVENT_READ)
        self.stopping = False
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        fixtures.defer(self.stop)

    def _run(self) -> None:
        while not self.stopping:
            for key, _ in self.sel.select(0.1):
                sock = key.fileobj
                if sock is self.listener:
                    try:
                        conn, _ = self.listener.accept()
                    except BlockingIOError:
                        continue
                    self.sel.register(conn, selectors.EVENT_READ)
                    continue
                try:
                    data = sock.recv(4096)
                except OSError:
                    data = b""
                if data:
                    sock.sendall(data)
                else:
                    self.sel.unregister(sock)
                    sock.close()

    def stop(self) -> None:
        self.stopping = True
        self.thread.join(5)
        for key in list(self.sel.get_map().values()):
            key.fileobj.close()
        self.sel.close()


def raise_fd_limit(wanted: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(wanted, hard), hard))


def measure(workdir: fixtures.Workdir, build_dir: str, streams: int, step=None) -> dict:
    """Opens `streams` idle streams through a fresh agent pair and reads both agents' memory."""
    raise_fd_limit(2 * streams + 256)
    server = workdir.join("echo.sock")
    client = workdir.join("client.sock")
    EchoServer(server)
    pair = Pair(workdir, build_dir, "idle", guest_args=["--allow-unix", server, "--no-ports"],
                host_args=["--forward-unix", f"{client}={server}", "--no-docker", "--no-follow-ports"]).start()
    fixtures.wait_for_unix_socket(client, timeout=10, process=pair.host)
    before = pair.memory()
    conns: list[socket.socket] = []
    fixtures.defer(lambda: [c.close() for c in conns])
    for i in range(streams):
        if step and i % 100 == 0:
            step(f"idle streams {i}/{streams}")
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        conns.append(s)
        s.settimeout(10)
        s.connect(client)
        s.sendall(b"x")
        if s.recv(1) != b"x":
            raise RuntimeError(f"stream {i} through vbridge did not echo")
    time.sleep(0.5)  # let both agents settle with every stream idle
    with_streams = pair.memory()
    open_streams = pair.status().get("mux", {}).get("streams")
    for c in conns:
        c.close()
    conns.clear()
    return {"streams": streams, "open_streams_reported": open_streams, "before": before, "with_streams": with_streams,
            "rss_mib": {side: round(with_streams[side]["rss_kib"] / 1024, 2) for side in ("host", "guest")}}


def main() -> int:
    args = tool_arguments("idle_streams", __doc__,
                          lambda parser: parser.add_argument("--streams", type=int, default=1000))
    with fixtures.scope():
        result = measure(fixtures.Workdir("vbidle"), args.build_dir, args.streams)
    for side in ("host", "guest"):
        b, w = result["before"][side], result["with_streams"][side]
        print(f"{side:5} agent: VmRSS {b['rss_kib'] / 1024:.1f} MiB idle, {w['rss_kib'] / 1024:.1f} MiB with "
              f"{result['streams']} idle streams (VmHWM {w['hwm_kib'] / 1024:.1f} MiB)")
    print(f"streams reported by the host agent: {result['open_streams_reported']}")
    write_json(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
