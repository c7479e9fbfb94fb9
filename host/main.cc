// vbridge-host: the workstation side of vbridge. Serves a drop-in docker.sock (and other unix forwards) over
// one multiplexed transport connection to vbridge-guest.
#include <sys/resource.h>
#include <sys/stat.h>
#include <unistd.h>

#include <CLI/CLI.hpp>
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <filesystem>

#include "host/agent.h"
#include "host/docker_context.h"
#include "protocol/log.h"
#include "protocol/shared_memory.h"
#include "protocol/token_file.h"

namespace {

std::string default_runtime_dir(const std::string& instance) {
  if (const char* xdg = std::getenv("XDG_RUNTIME_DIR"); xdg != nullptr && *xdg != '\0') {
    return std::string(xdg) + "/vbridge/" + instance;
  }
  if (::getuid() == 0) return "/run/vbridge/" + instance;
  return "/tmp/vbridge-" + std::to_string(::getuid()) + "/" + instance;
}

// [HOSTADDR:]HOSTPORT:GUESTPORT[/udp]
vbridge::Result<vbridge::StaticPortForward> parse_publish(std::string text) {
  using vbridge::Error;
  using vbridge::ErrorCode;
  vbridge::StaticPortForward f;
  if (text.size() > 4 && text.substr(text.size() - 4) == "/udp") {
    f.proto = vbridge::wire::Proto::Udp;
    text.resize(text.size() - 4);
  } else if (text.size() > 4 && text.substr(text.size() - 4) == "/tcp") {
    text.resize(text.size() - 4);
  }
  const size_t last = text.rfind(':');
  if (last == std::string::npos)
    return Error{ErrorCode::kConfig, 0, "expected [HOSTADDR:]HOSTPORT:GUESTPORT[/udp]"};
  const size_t mid = text.rfind(':', last - 1);
  std::string host_port = text.substr(0, last);
  if (mid != std::string::npos && last > 0) {
    f.host_address = text.substr(0, mid);
    if (f.host_address.size() > 2 && f.host_address.front() == '[') {
      f.host_address = f.host_address.substr(1, f.host_address.size() - 2);
    }
    host_port = text.substr(mid + 1, last - mid - 1);
  }
  const int hp = std::atoi(host_port.c_str());
  const int gp = std::atoi(text.substr(last + 1).c_str());
  if (hp <= 0 || hp > 65535 || gp <= 0 || gp > 65535) {
    return Error{ErrorCode::kConfig, 0, "ports must be 1-65535"};
  }
  f.host_port = static_cast<uint16_t>(hp);
  f.guest_port = static_cast<uint16_t>(gp);
  return f;
}

}  // namespace

int main(int argc, char** argv) {
  using namespace vbridge;
  CLI::App app{"vbridge-host: bridges a docker.sock and other sockets to a guest VM over one transport."};
  std::string transport;
  std::string instance = "default";
  std::string runtime_dir;
  std::string docker_sock;
  std::string docker_target = "docker";
  bool no_docker = false;
  std::string docker_context;
  bool no_docker_context = false;
  std::vector<std::string> forwards;
  std::vector<std::string> exposed;
  std::string status_sock;
  std::string log_level = "info";
  std::string token_file;
  std::string shm_file;
  size_t shm_size_mib = kDefaultSharedSize >> 20;
  uint32_t window_kib = 4096;
  int keepalive_ms = 5000;
  bool splice = false;
  bool serial_chardev = false;
  std::vector<std::string> shares;
  std::vector<std::string> publish;
  std::vector<std::string> port_maps;
  std::string bind_v4 = "127.0.0.1";
  std::string bind_v6 = "::1";
  bool no_follow_ports = false;
  int udp_idle_s = 60;

  app.add_option(
         "-t,--transport", transport,
         "Where the guest agent listens: unix:/path, tcp:HOST:PORT, vsock:CID:PORT, or hvsock:/path:PORT "
         "(Firecracker/cloud-hypervisor hybrid vsock; with QEMU virtio-serial, the chardev socket as "
         "unix:/path)")
      ->required();
  app.add_option("--token-file", token_file,
                 "File holding the shared secret the guest agent requires on unix: and tcp: transports (the "
                 "same file as vbridge-guest --token-file; mode 0600)");
  app.add_option("--shm-file", shm_file,
                 "Memory shared with the guest agent (give it the same file, or ivshmem in a VM): bytes read "
                 "from host clients land in it and the guest agent writes them out from there, so the "
                 "transport carries references instead of the bytes. Created mode 0600; put it on tmpfs");
  app.add_option("--shm-size-mib", shm_size_mib, "Size of --shm-file in MiB, both halves")
      ->check(CLI::Range(size_t{2}, size_t{4095}))
      ->capture_default_str();
  app.add_option("-i,--instance", instance, "Instance name; keeps several VMs' sockets apart")
      ->capture_default_str();
  app.add_option("--runtime-dir", runtime_dir,
                 "Directory for this instance's sockets (default $XDG_RUNTIME_DIR/vbridge/INSTANCE, "
                 "/run/vbridge/INSTANCE as root)");
  app.add_option("--docker-sock", docker_sock,
                 "Host path of the bridged Docker socket (default RUNTIME_DIR/docker.sock)");
  app.add_option("--docker-target", docker_target,
                 "Guest target of the Docker socket: a name the guest agent maps, or an absolute guest path")
      ->capture_default_str();
  app.add_flag("--no-docker", no_docker, "Do not serve a Docker socket");
  app.add_option("--docker-context", docker_context,
                 "Name of the docker CLI context to create (default vbridge, or vbridge-INSTANCE)");
  app.add_flag("--no-docker-context", no_docker_context, "Do not create a docker CLI context");
  app.add_option(
      "-L,--forward-unix", forwards,
      "Extra unix socket forward HOST_PATH=GUEST_TARGET (repeatable); GUEST_TARGET is a name the guest "
      "agent maps or an absolute guest path it allows");
  app.add_option(
      "--expose-unix", exposed,
      "Let the guest reach a host unix socket: NAME=/host/path.sock (repeatable). The guest agent's "
      "--reverse-unix /guest/path.sock=NAME carries its clients here; other names are refused");
  app.add_option(
      "-p,--publish", publish,
      "Static port forward [HOSTADDR:]HOSTPORT:GUESTPORT[/udp] (repeatable), kept whatever the guest "
      "listens on");
  app.add_option("--port-map", port_maps,
                 "Bind guest port GUEST on host port HOST when following the guest: GUEST=HOST (repeatable)");
  app.add_option("--bind-address", bind_v4, "IPv4 address followed ports bind on")->capture_default_str();
  app.add_option("--bind-address6", bind_v6, "IPv6 address followed ports bind on")->capture_default_str();
  app.add_flag("--no-follow-ports", no_follow_ports, "Do not forward the ports the guest listens on");
  app.add_option("--udp-idle-seconds", udp_idle_s, "End a UDP flow after this long without traffic")
      ->capture_default_str()
      ->check(CLI::Range(1, 86400));
  app.add_option("--status-sock", status_sock,
                 "Status socket answering one JSON document per connection "
                 "(default RUNTIME_DIR/status.sock)");
  app.add_option("--window-kib", window_kib, "Per-stream receive window in KiB")
      ->capture_default_str()
      ->check(CLI::Range(64u, 1024u * 1024u));
  app.add_option(
      "--share", shares,
      "Replay changes under HOST_DIR as inotify events in the guest: NAME=HOST_DIR (repeatable); the guest "
      "agent maps NAME to its mount of the folder with its own --share NAME=GUEST_PATH");
  app.add_flag(
      "--serial-chardev", serial_chardev,
      "The transport is a VMM's virtio-serial chardev socket (QEMU): the byte pipe outlives both agents, "
      "so skip a restarted guest's stale bytes until its HELLO instead of failing");
  app.add_flag(
      "--splice", splice,
      "Move bulk transfers from host clients to the transport by splice(2) through a pipe instead of "
      "read + gather write (fewer copies in this agent; see bench/RESULTS.md for when it wins)");
  app.add_option("--keepalive-ms", keepalive_ms, "PING period; three missed answers drop the transport")
      ->capture_default_str()
      ->check(CLI::Range(100, 600000));
  app.add_option("--log-level", log_level, "debug, info, warn or error")->capture_default_str();
  CLI11_PARSE(app, argc, argv);

  log::set_component("vbridge-host");
  log::Level level;
  if (!log::parse_level(log_level, &level)) {
    log::error("bad --log-level \"{}\": use debug, info, warn or error", log_level);
    return 2;
  }
  log::set_level(level);

  auto address = parse_address(transport);
  if (!address) {
    log::error("--transport: {}", address.error().message);
    return 2;
  }
  if (runtime_dir.empty()) runtime_dir = default_runtime_dir(instance);
  std::error_code ec;
  std::filesystem::create_directories(runtime_dir, ec);
  if (ec) {
    log::error("cannot create runtime directory {}: {}; pass --runtime-dir", runtime_dir, ec.message());
    return 1;
  }
  ::chmod(runtime_dir.c_str(), 0700);

  AgentConfig config;
  config.transport = *address;
  config.instance = instance;
  config.status_path = status_sock.empty() ? runtime_dir + "/status.sock" : status_sock;
  config.keepalive_ms = keepalive_ms;
  config.splice = splice;
  config.mux.initial_window = window_kib * 1024;
  config.mux.resync = serial_chardev;
  if (!token_file.empty()) {
    if (serial_chardev) {
      log::error("--token-file is not used with --serial-chardev: the virtio-serial port is the VM's own");
      return 2;
    }
    auto token = read_token_file(token_file);
    if (!token) {
      log::error("{}", token.error().message);
      return 2;
    }
    config.mux.hello_token = std::move(*token);
    config.token_file = token_file;
  }
  if (!shm_file.empty()) {
    auto shared = SharedMemory::create(shm_file, shm_size_mib << 20);
    if (!shared) {
      log::error("{}", shared.error().message);
      return 2;
    }
    config.shared = std::move(*shared);
  }
  for (const std::string& share : shares) {
    const size_t eq = share.find('=');
    if (eq == std::string::npos || eq == 0 || eq + 1 == share.size()) {
      log::error("bad --share \"{}\": expected NAME=HOST_DIR", share);
      return 2;
    }
    std::error_code dir_error;
    const std::string root = std::filesystem::canonical(share.substr(eq + 1), dir_error).string();
    if (dir_error || !std::filesystem::is_directory(root)) {
      log::error("--share {}: {} is not a directory", share, share.substr(eq + 1));
      return 2;
    }
    config.shares.push_back({share.substr(0, eq), root});
  }
  if (!config.shares.empty()) config.mux.features |= kFeatureFileEvents;
  if (!no_docker) {
    if (docker_sock.empty()) docker_sock = runtime_dir + "/docker.sock";
    config.unix_forwards.push_back({docker_sock, docker_target, true});
  }
  for (const std::string& f : forwards) {
    const size_t eq = f.find('=');
    if (eq == std::string::npos || eq == 0 || eq + 1 == f.size()) {
      log::error("bad --forward-unix \"{}\": expected HOST_PATH=GUEST_TARGET", f);
      return 2;
    }
    config.unix_forwards.push_back({f.substr(0, eq), f.substr(eq + 1), false});
  }

  for (const std::string& e : exposed) {
    auto parsed = parse_expose_unix(e);
    if (!parsed) {
      log::error("{}", parsed.error().message);
      return 2;
    }
    config.exposed_unix[parsed->first] = parsed->second;
  }

  config.ports.follow_guest = !no_follow_ports;
  config.ports.bind_v4 = bind_v4;
  config.ports.bind_v6 = bind_v6;
  config.ports.udp_idle_timeout = std::chrono::seconds(udp_idle_s);
  for (const std::string& m : port_maps) {
    unsigned guest = 0, host = 0;
    char tail = 0;
    if (std::sscanf(m.c_str(), "%u=%u%c", &guest, &host, &tail) != 2 || guest == 0 || host == 0 ||
        guest > 65535 || host > 65535) {
      log::error("bad --port-map \"{}\": expected GUESTPORT=HOSTPORT, e.g. 80=8080", m);
      return 2;
    }
    config.ports.remap[static_cast<uint16_t>(guest)] = static_cast<uint16_t>(host);
  }
  for (const std::string& p : publish) {
    auto parsed = parse_publish(p);
    if (!parsed) {
      log::error("bad --publish \"{}\": {}", p, parsed.error().message);
      return 2;
    }
    config.static_ports.push_back(*parsed);
  }

  std::signal(SIGPIPE, SIG_IGN);
  // Every forwarded port and every connection holds descriptors, and a guest may listen on thousands of
  // ports: the soft limit (often 1024) is raised to the hard one.
  if (rlimit rl{}; ::getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < rl.rlim_max) {
    rl.rlim_cur = rl.rlim_max;
    ::setrlimit(RLIMIT_NOFILE, &rl);
  }
  uv_loop_t* loop = uv_default_loop();
  Agent agent(loop, config);
  // Caught from before the first socket exists: a stop that arrives while the agent starts is handled once
  // the loop runs, and ends it cleanly, with its sockets removed, rather than by the default action.
  uv_signal_t sigterm, sigint;
  uv_signal_init(loop, &sigterm);
  uv_signal_init(loop, &sigint);
  sigterm.data = sigint.data = &agent;
  const auto on_signal = [](uv_signal_t* handle, int signum) {
    log::info("received signal {}, shutting down", signum);
    static_cast<Agent*>(handle->data)->stop();
  };
  uv_signal_start(&sigterm, on_signal, SIGTERM);
  uv_signal_start(&sigint, on_signal, SIGINT);
  // Once stopping, the signal handles must not keep the loop alive.
  uv_unref(reinterpret_cast<uv_handle_t*>(&sigterm));
  uv_unref(reinterpret_cast<uv_handle_t*>(&sigint));
  if (Status st = agent.start(); !st) {
    log::error("{}", st.error().to_string());
    return 1;
  }

  if (!no_docker) {
    if (docker_context.empty()) docker_context = instance == "default" ? "vbridge" : "vbridge-" + instance;
    if (!no_docker_context) {
      if (Status st = ensure_docker_context(docker_context, docker_sock); !st) {
        log::warn("{}", st.error().message);
      } else {
        log::info("docker context {} points at the bridge: docker --context {} ps", docker_context,
                  docker_context);
      }
    }
    log::info("DOCKER_HOST=unix://{}", docker_sock);
  }

  uv_run(loop, UV_RUN_DEFAULT);
  return 0;
}
