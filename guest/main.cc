// vbridge-guest: the agent inside the VM. Wires the command line to an Agent and runs it.
#include <signal.h>
#include <sys/resource.h>

#include <CLI/CLI.hpp>
#include <string>
#include <vector>

#include "guest/agent.h"
#include "protocol/address.h"
#include "protocol/log.h"
#include "protocol/shared_memory.h"
#include "protocol/token_file.h"

int main(int argc, char** argv) {
  using namespace vbridge;
  CLI::App app{
      "vbridge guest agent: runs inside the VM, waits for the host agent on one transport and connects the "
      "host's\n"
      "streams to guest sockets (the Docker API socket, named unix sockets, loopback ports). Tells the host "
      "which\n"
      "TCP and UDP ports guest programs listen on, so the host can forward them."};
  std::string listen;
  std::string docker_socket = guest::kDefaultDockerSocket;
  std::vector<std::string> forwards;
  std::vector<std::string> allow_unix;
  bool allow_ports = false;
  bool no_ports = false;
  unsigned port_poll_ms = 20;
  std::vector<std::string> reverse_unix;
  std::vector<std::string> shares;
  std::string log_level = "info";
  std::string token_file;
  bool insecure_no_token = false;
  double drain_seconds = 2.0;
  bool no_buffer_ring = false;
  bool splice = false;
  size_t buffer_kib = 256;
  std::string shm_file;
  uint32_t window_kib = 4096;

  app.add_option(
         "--listen", listen,
         "Where to wait for the host agent: vsock:PORT (production; only the host, CID 2, may connect), "
         "serial:NAME or serial:/dev/virtio-ports/NAME (virtio-serial port, held open for the agent's "
         "life), unix:/path or tcp:HOST:PORT (tests, remote guests)")
      ->required();
  app.add_option(
      "--token-file", token_file,
      "File holding the shared secret (16 to 256 bytes, mode 0600) that the host agent's HELLO must carry; "
      "give vbridge-host the same file. Required with unix: and tcp: transports, where any local process "
      "could otherwise connect");
  app.add_flag("--insecure-no-token", insecure_no_token,
               "Accept host connections on a unix: or tcp: transport without a token (anyone who can reach "
               "the socket can use the bridge)");
  app.add_option("--docker-socket", docker_socket,
                 "Guest Docker API socket that the host's \"docker\" target reaches")
      ->capture_default_str();
  app.add_option(
      "--forward", forwards,
      "NAME=/path/to.sock: define a named unix socket target the host may open by NAME (repeatable)");
  app.add_option(
      "--allow-unix", allow_unix,
      "Allow the host to open this absolute unix socket path directly (repeatable); other paths are "
      "refused with EACCES");
  app.add_flag(
      "--allow-ports", allow_ports,
      "Allow the host to open TCP and UDP flows to any guest loopback port (127.0.0.1, ::1), listened on "
      "or not, as static forwards (vbridge-host -p) of ports that appear later need. Without it only ports "
      "the port watcher reports a guest listener on may be dialled");
  app.add_flag("--no-ports", no_ports,
               "Do not watch the guest's listening TCP and UDP sockets (no PORTS messages to the host; only "
               "--allow-ports then allows port targets)");
  app.add_option("--port-poll-ms", port_poll_ms,
                 "Milliseconds between two scans of the guest's listening sockets (NETLINK_SOCK_DIAG); a new "
                 "listener reaches the host within about this long")
      ->check(CLI::Range(1u, 60000u))
      ->capture_default_str();
  app.add_option(
      "--reverse-unix", reverse_unix,
      "/GUEST/PATH.sock=NAME: listen on this guest unix socket and carry each client to the host's "
      "target NAME (vbridge-host --expose-unix NAME=/host/path.sock) (repeatable)");
  app.add_option(
      "--share", shares,
      "NAME=/guest/mount: the guest's mount of a host folder the host agent watches (vbridge-host --share "
      "NAME=HOST_DIR); host changes under it are replayed here as inotify events (repeatable)");
  app.add_option("--log-level", log_level, "Log verbosity: debug, info, warn or error")
      ->check(CLI::IsMember({"debug", "info", "warn", "error"}))
      ->capture_default_str();
  app.add_option("--drain-timeout", drain_seconds,
                 "On SIGTERM/SIGINT: seconds to let open streams finish after GOAWAY before closing them")
      ->check(CLI::NonNegativeNumber)
      ->capture_default_str();
  app.add_flag(
      "--no-buffer-ring", no_buffer_ring,
      "Read into a pool buffer per read instead of io_uring provided-buffer rings (the automatic fallback "
      "on kernels before 5.19; also useful for comparison)");
  app.add_flag(
      "--splice", splice,
      "Move bulk transfers from guest sockets to the transport by splice(2) through a pipe instead of "
      "reads into memory (fewer copies in this agent; see bench/RESULTS.md for when it wins)");
  app.add_option(
      "--shm-file", shm_file,
      "Memory shared with the host agent (its --shm-file): a file both agents map, or \"pci\" for the VM's "
      "ivshmem device. Bytes read from guest sockets land in it and the host agent writes them out from "
      "there, so the transport carries references instead of the bytes");
  app.add_option("--window-kib", window_kib,
                 "Per-stream receive window in KiB: how much the host may send ahead")
      ->check(CLI::Range(uint32_t{64}, uint32_t{1u << 20}))
      ->capture_default_str();
  app.add_option("--buffer-kib", buffer_kib,
                 "Size of one read buffer in KiB; also the largest single read from a socket")
      ->check(CLI::Range(size_t{4}, size_t{1024}))
      ->capture_default_str();
  CLI11_PARSE(app, argc, argv);

  log::set_component("guest");
  log::Level level = log::Level::kInfo;
  log::parse_level(log_level, &level);
  log::set_level(level);
  // Writes use MSG_NOSIGNAL on sockets, but a serial port write cannot; a vanished peer is an error value.
  signal(SIGPIPE, SIG_IGN);
  // One descriptor per stream (each forwarded connection and UDP flow): the soft limit goes up to the hard
  // one.
  if (rlimit rl{}; getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < rl.rlim_max) {
    rl.rlim_cur = rl.rlim_max;
    setrlimit(RLIMIT_NOFILE, &rl);
  }

  guest::AgentConfig config;
  auto address = parse_address(listen);
  if (!address) {
    log::error("--listen: {}", address.error().message);
    return 2;
  }
  config.listen = *address;
  if (!token_file.empty()) {
    auto token = read_token_file(token_file);
    if (!token) {
      log::error("{}", token.error().message);
      return 2;
    }
    config.token = std::move(*token);
  } else if ((address->kind == Address::Kind::kUnix || address->kind == Address::Kind::kTcp) &&
             !insecure_no_token) {
    log::error(
        "--listen {} lets any process that reaches it use the bridge: pass --token-file PATH (a 0600 file of "
        "16+ random bytes, also given to vbridge-host --token-file) or --insecure-no-token",
        address->to_string());
    return 2;
  }
  config.targets.docker_socket = docker_socket;
  for (const auto& text : forwards) {
    auto forward = guest::parse_forward(text);
    if (!forward) {
      log::error("{}", forward.error().message);
      return 2;
    }
    config.targets.forwards[forward->first] = forward->second;
  }
  config.targets.allow_unix.insert(allow_unix.begin(), allow_unix.end());
  config.targets.allow_ports = allow_ports;
  config.ports.enabled = !no_ports;
  config.ports.interval = std::chrono::milliseconds(port_poll_ms);
  for (const auto& text : reverse_unix) {
    auto reverse = guest::parse_reverse_unix(text);
    if (!reverse) {
      log::error("{}", reverse.error().message);
      return 2;
    }
    config.reverse_unix.push_back(std::move(*reverse));
  }
  for (const auto& text : shares) {
    const size_t eq = text.find('=');
    if (eq == std::string::npos || eq == 0 || eq + 1 == text.size() || text[eq + 1] != '/') {
      log::error("bad --share \"{}\": expected NAME=/guest/mount", text);
      return 2;
    }
    config.shares.push_back({text.substr(0, eq), text.substr(eq + 1)});
  }
  config.drain_timeout = std::chrono::milliseconds(static_cast<int64_t>(drain_seconds * 1000));
  config.buffer_rings = !no_buffer_ring;
  config.splice = splice;
  config.buffer_size = buffer_kib * 1024;
  config.mux.initial_window = window_kib * 1024;
  // Without its shared memory the bridge still works, copying every byte: a warning, not a stop.
  if (!shm_file.empty()) {
    const std::string path = shm_file == "pci" ? SharedMemory::find_ivshmem_bar() : shm_file;
    if (path.empty()) {
      log::warn(
          "--shm-file pci: no ivshmem PCI device (1af4:1110) in /sys/bus/pci/devices; continuing without "
          "shared memory");
    } else if (auto shared = SharedMemory::attach(path); !shared) {
      log::warn("{}; continuing without shared memory", shared.error().message);
    } else {
      config.shared = std::move(*shared);
    }
  }

  auto agent = guest::Agent::create(std::move(config));
  if (!agent) {
    log::error("{}", agent.error().to_string());
    return 1;
  }
  return (*agent)->run();
}
