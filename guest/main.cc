// vbridge-guest: the agent inside the VM. Wires the command line to an Agent and runs it.
#include <CLI/CLI.hpp>
#include <signal.h>

#include <string>
#include <vector>

#include "guest/agent.h"
#include "protocol/address.h"
#include "protocol/log.h"

int main(int argc, char** argv) {
  using namespace vbridge;
  CLI::App app{
      "vbridge guest agent: runs inside the VM, waits for the host agent on one transport and connects the host's\n"
      "streams to guest sockets (the Docker API socket, named unix sockets, loopback ports)."};
  std::string listen;
  std::string docker_socket = guest::kDefaultDockerSocket;
  std::vector<std::string> forwards;
  std::vector<std::string> allow_unix;
  bool allow_ports = false;
  std::string log_level = "info";
  double drain_seconds = 2.0;
  bool no_buffer_ring = false;
  size_t buffer_kib = 256;

  app.add_option("--listen", listen,
                 "Where to wait for the host agent: vsock:PORT (production; only the host, CID 2, may connect), "
                 "serial:NAME or serial:/dev/virtio-ports/NAME (virtio-serial port, held open for the agent's "
                 "life), unix:/path or tcp:HOST:PORT (tests, remote guests)")
      ->required();
  app.add_option("--docker-socket", docker_socket,
                 "Guest Docker API socket that the host's \"docker\" target reaches")
      ->capture_default_str();
  app.add_option("--forward", forwards,
                 "NAME=/path/to.sock: define a named unix socket target the host may open by NAME (repeatable)");
  app.add_option("--allow-unix", allow_unix,
                 "Allow the host to open this absolute unix socket path directly (repeatable); other paths are "
                 "refused with EACCES");
  app.add_flag("--allow-ports", allow_ports,
               "Allow the host to open TCP connections to guest loopback ports (127.0.0.1, ::1), as port forwards "
               "need; off by default");
  app.add_option("--log-level", log_level, "Log verbosity: debug, info, warn or error")
      ->check(CLI::IsMember({"debug", "info", "warn", "error"}))
      ->capture_default_str();
  app.add_option("--drain-timeout", drain_seconds,
                 "On SIGTERM/SIGINT: seconds to let open streams finish after GOAWAY before closing them")
      ->check(CLI::NonNegativeNumber)
      ->capture_default_str();
  app.add_flag("--no-buffer-ring", no_buffer_ring,
               "Read into a pool buffer per read instead of io_uring provided-buffer rings (the automatic fallback "
               "on kernels before 5.19; also useful for comparison)");
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

  guest::AgentConfig config;
  auto address = parse_address(listen);
  if (!address) {
    log::error("--listen: {}", address.error().message);
    return 2;
  }
  config.listen = *address;
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
  config.drain_timeout = std::chrono::milliseconds(static_cast<int64_t>(drain_seconds * 1000));
  config.buffer_rings = !no_buffer_ring;
  config.buffer_size = buffer_kib * 1024;

  auto agent = guest::Agent::create(std::move(config));
  if (!agent) {
    log::error("{}", agent.error().to_string());
    return 1;
  }
  return (*agent)->run();
}
