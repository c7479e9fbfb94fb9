"""Forwarding paths compared by the end-to-end benchmark (python3 standard library only).

A *path* carries a client's connection to the loadgen server. Every path object has:

    name          short name shown in the table ("direct", "socat2", "ssh-L", "vbridge"; the yardsticks
                  "relay", "relay2" and "splice" run only when --paths names them: opt_in)
    family        "unix" or "tcp": the kind of socket on both ends
    label         "<name>/<family>"
    available()   -> (bool, reason): whether the path can run on this machine, and why not
    start()       bring the path up; returns once a connection through it has been answered
    client_addr   loadgen address (unix:/path or tcp:127.0.0.1:port) that clients connect to
    stop()        tear it down; safe to call twice and after a failed start()

Every process is started through Children, which remembers its PID and stops it, together with the
processes it forked, by PID, also on Ctrl-C or an exception (run_e2e.py calls Env.close() in a finally).
"""

from __future__ import annotations

import json
import os
import secrets
import selectors
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path as FsPath

SERVER_SOCK = "server.sock"


# --------------------------------------------------------------------------------------------------------
# Processes


def _process_table() -> dict[int, int]:
    """pid -> parent pid for every live process."""
    table = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", encoding="ascii", errors="replace") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2:].split()
        if fields and fields[0] != "Z":
            table[int(entry)] = int(fields[1])
    return table


def _tree(pid: int) -> list[int]:
    """pid and all of its live descendants, parents first."""
    table = _process_table()
    children: dict[int, list[int]] = {}
    for child, parent in table.items():
        children.setdefault(parent, []).append(child)
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        if p in table:
            out.append(p)
        todo.extend(children.get(p, []))
    return out


def _alive(pid: int) -> bool:
    return pid in _process_table()


class Children:
    """Processes started by the harness. Each runs in its own session, so a Ctrl-C on the terminal reaches
    only the harness, which then stops them in order."""

    def __init__(self, log_dir: FsPath):
        self.log_dir = log_dir
        self.procs: list[subprocess.Popen] = []

    def spawn(self, argv: list[str], log_name: str, stdout=None) -> subprocess.Popen:
        log = open(self.log_dir / log_name, "ab")
        try:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL,
                                    stdout=stdout if stdout is not None else log,
                                    stderr=log, start_new_session=True)
        finally:
            log.close()
        self.procs.append(proc)
        return proc

    def run(self, argv: list[str], timeout: float) -> subprocess.CompletedProcess:
        """Runs a short-lived command to completion (bounded by timeout), capturing its output."""
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, start_new_session=True, text=True)
        self.procs.append(proc)
        try:
            out, err = proc.communicate(timeout=timeout)
        except BaseException:
            self.stop(proc)
            proc.communicate()
            raise
        self.procs.remove(proc)
        return subprocess.CompletedProcess(argv, proc.returncode, out, err)

    def stop(self, proc: subprocess.Popen, grace: float = 2.0) -> None:
        """SIGTERM to the process and everything it forked (by PID), SIGKILL to whatever outlives grace."""
        pids = _tree(proc.pid) if proc.poll() is None else []
        for pid in pids:
            _signal(pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            proc.poll()
            if not any(_alive(p) for p in pids if p != proc.pid) and proc.returncode is not None:
                break
            time.sleep(0.02)
        for pid in pids:
            if pid == proc.pid and proc.poll() is not None:
                continue
            if _alive(pid):
                _signal(pid, signal.SIGKILL)
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            pass
        if proc in self.procs:
            self.procs.remove(proc)

    def stop_all(self) -> None:
        for proc in reversed(list(self.procs)):
            self.stop(proc)


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


# --------------------------------------------------------------------------------------------------------
# Sockets


def free_tcp_port() -> int:
    """A loopback port that was free a moment ago (the kernel's choice for port 0)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _socket_for(addr: str) -> tuple[socket.socket, object]:
    kind, _, rest = addr.partition(":")
    if kind == "unix":
        return socket.socket(socket.AF_UNIX, socket.SOCK_STREAM), rest
    host, _, port = rest.rpartition(":")
    if host.startswith("["):
        return socket.socket(socket.AF_INET6, socket.SOCK_STREAM), (host[1:-1], int(port))
    return socket.socket(socket.AF_INET, socket.SOCK_STREAM), (host, int(port))


def probe(addr: str, timeout: float = 1.0) -> bool:
    """One loadgen connect test ('C' -> 'k') through addr."""
    sock, target = _socket_for(addr)
    with sock:
        sock.settimeout(timeout)
        try:
            sock.connect(target)
            sock.sendall(b"C")
            return sock.recv(1) == b"k"
        except OSError:
            return False


def wait_until(check, deadline_s: float, what: str, procs: tuple[subprocess.Popen, ...] = ()) -> None:
    """Polls check() until it holds; fails early when one of procs exits, and at the deadline."""
    deadline = time.monotonic() + deadline_s
    delay = 0.005
    while True:
        if check():
            return
        for p in procs:
            if p.poll() is not None:
                raise RuntimeError(f"{what}: {p.args[0]} exited with status {p.returncode}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what}: not ready after {deadline_s:.0f} s")
        time.sleep(delay)
        delay = min(delay * 2, 0.1)


# --------------------------------------------------------------------------------------------------------
# Environment: temp dir, children, the loadgen server


class Env:
    """Owns the temp dir, every child process and the loadgen server the paths lead to."""

    def __init__(self, loadgen: str, build_dir: str | None, keep_tmp: bool = False):
        self.loadgen = os.path.abspath(loadgen)
        self.build_dir = FsPath(build_dir).resolve() if build_dir else None
        self.keep_tmp = keep_tmp
        self.tmp = FsPath(tempfile.mkdtemp(prefix="vbridge-e2e-"))
        self.children = Children(self.tmp)
        self.server_unix = ""
        self.server_tcp = ""
        self._ssh: SshServer | None = None
        self.ready = None     # addr -> bool: a path is up once this holds (default: a loadgen connect test)
        self.docker = False   # the server is a Docker API socket (vbridge then serves its own docker.sock)
        self.vbridge_shm = True  # the agents share memory (--shm-file), as `vbridge up` sets them up

    def start_server(self) -> None:
        sock = self.tmp / SERVER_SOCK
        proc = self.children.spawn([self.loadgen, "serve", "--unix", str(sock), "--tcp", "127.0.0.1:0"],
                                   "loadgen-serve.log", stdout=subprocess.PIPE)
        line = _read_line(proc, 10.0)
        listening = json.loads(line)["listening"]
        self.server_unix = next(a for a in listening if a.startswith("unix:"))
        self.server_tcp = next(a for a in listening if a.startswith("tcp:"))
        for addr in (self.server_unix, self.server_tcp):
            wait_until(lambda a=addr: probe(a), 10.0, "loadgen server", (proc,))

    def server_addr(self, family: str) -> str:
        return self.server_unix if family == "unix" else self.server_tcp

    def server_port(self) -> int:
        return int(self.server_tcp.rpartition(":")[2])

    def ssh_server(self) -> "SshServer":
        if self._ssh is None:
            self._ssh = SshServer(self)
            self._ssh.start()
        return self._ssh

    def close(self) -> None:
        self.children.stop_all()
        if not self.keep_tmp:
            shutil.rmtree(self.tmp, ignore_errors=True)


class EnvView:
    """The paths of an Env led to another unix socket server (dockerd's, say) instead of the loadgen's.

    Shares the Env's children and sshd; files go to a sub-folder, so the two sets of paths never collide.
    `ready(addr)` tells when a path to this server is up.
    """

    def __init__(self, env: Env, name: str, server_unix: str, ready, docker: bool = False):
        self.env = env
        self.loadgen = env.loadgen
        self.build_dir = env.build_dir
        self.children = env.children
        self.tmp = env.tmp / name
        self.tmp.mkdir(exist_ok=True)
        self.server_unix = f"unix:{server_unix}"
        self.server_tcp = ""
        self.ready = ready
        self.docker = docker
        self.vbridge_shm = env.vbridge_shm

    def server_addr(self, family: str) -> str:
        if family != "unix":
            raise RuntimeError("this server listens on a unix socket only")
        return self.server_unix

    def server_port(self) -> int:
        raise RuntimeError("this server listens on a unix socket only")

    def ssh_server(self) -> "SshServer":
        return self.env.ssh_server()


def _read_line(proc: subprocess.Popen, timeout: float) -> str:
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    buf = b""
    deadline = time.monotonic() + timeout
    while b"\n" not in buf:
        left = deadline - time.monotonic()
        if left <= 0 or not sel.select(left):
            raise RuntimeError(f"{proc.args[0]}: no output within {timeout:.0f} s")
        chunk = os.read(proc.stdout.fileno(), 4096)
        if not chunk:
            raise RuntimeError(f"{proc.args[0]} exited with status {proc.wait()}")
        buf += chunk
    sel.close()
    return buf.split(b"\n", 1)[0].decode()


# --------------------------------------------------------------------------------------------------------
# The agents


def find_agent(build_dir: FsPath | str | None, binary: str) -> str | None:
    """vbridge-host or vbridge-guest in a build folder (top level, host/ or guest/), or None."""
    if build_dir is None:
        return None
    base = FsPath(build_dir)
    for candidate in (base / binary, base / "host" / binary, base / "guest" / binary):
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    return None


_takes_token: dict[str, bool] = {}


def token_flags(guest_binary: str, directory: FsPath | str) -> list[str]:
    """`--token-file FILE` for both agents when this build takes one (a fresh 0600 file of random bytes in
    directory), else nothing. Both agents of one pair get the same flags."""
    if guest_binary not in _takes_token:
        try:
            r = subprocess.run([guest_binary, "--help"], capture_output=True, text=True, timeout=10)
            _takes_token[guest_binary] = "--token-file" in r.stdout + r.stderr
        except (OSError, subprocess.TimeoutExpired):
            _takes_token[guest_binary] = False
    if not _takes_token[guest_binary]:
        return []
    path = FsPath(directory) / "token"
    if not path.exists():
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32) + "\n")
    return ["--token-file", str(path)]


# --------------------------------------------------------------------------------------------------------
# Paths


class Path:
    name = "path"
    opt_in = False  # True: runs only when --paths names it

    def __init__(self, env: Env, family: str):
        assert family in ("unix", "tcp")
        self.env = env
        self.family = family
        self.client_addr = ""
        self._procs: list[subprocess.Popen] = []

    @property
    def label(self) -> str:
        return f"{self.name}/{self.family}"

    def available(self) -> tuple[bool, str]:
        return True, ""

    def start(self) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        for proc in reversed(self._procs):
            self.env.children.stop(proc)
        self._procs.clear()

    def _spawn(self, argv: list[str], log_name: str) -> subprocess.Popen:
        proc = self.env.children.spawn(argv, log_name)
        self._procs.append(proc)
        return proc

    def _wait_ready(self, deadline_s: float = 10.0) -> None:
        check = self.env.ready or probe
        wait_until(lambda: check(self.client_addr), deadline_s, self.label, tuple(self._procs))


class DirectPath(Path):
    """The client talks to the server's own socket: the baseline of every ratio."""
    name = "direct"

    def start(self) -> None:
        self.client_addr = self.env.server_addr(self.family)


class Socat2Path(Path):
    """Two socat relays in a row, as a forward through a relay on each side of a VM boundary looks:
    client -> socat A -> socat B -> server, 256 KiB buffers, one forked child per connection."""
    name = "socat2"

    def available(self) -> tuple[bool, str]:
        return (True, "") if shutil.which("socat") else (False, "socat not installed")

    def start(self) -> None:
        socat = shutil.which("socat")
        tmp = self.env.tmp
        if self.family == "unix":
            a, b = tmp / "socat-a.sock", tmp / "socat-b.sock"
            server = self.env.server_unix.removeprefix("unix:")
            # The relay next to the server first, so the outer one never dials a missing socket.
            self._spawn([socat, "-b262144", f"UNIX-LISTEN:{b},fork", f"UNIX-CONNECT:{server}"], "socat-unix-b.log")
            self._spawn([socat, "-b262144", f"UNIX-LISTEN:{a},fork", f"UNIX-CONNECT:{b}"], "socat-unix-a.log")
            self.client_addr = f"unix:{a}"
        else:
            pa, pb = free_tcp_port(), free_tcp_port()
            server = self.env.server_port()
            self._spawn([socat, "-b262144", f"TCP-LISTEN:{pb},bind=127.0.0.1,reuseaddr,fork",
                         f"TCP:127.0.0.1:{server}"], "socat-tcp-b.log")
            self._spawn([socat, "-b262144", f"TCP-LISTEN:{pa},bind=127.0.0.1,reuseaddr,fork",
                         f"TCP:127.0.0.1:{pb}"], "socat-tcp-a.log")
            self.client_addr = f"tcp:127.0.0.1:{pa}"
        self._wait_ready()


class SshServer:
    """A private sshd on a loopback port: own host key, own config, one authorized client key.
    Runs as root with UsePAM no, so it needs nothing from the system's sshd setup but /run/sshd."""

    def __init__(self, env: Env):
        self.env = env
        self.dir = env.tmp / "ssh"
        self.port = 0
        self.client_key = self.dir / "client_ed25519"
        self.known_hosts = self.dir / "known_hosts"
        self.proc: subprocess.Popen | None = None

    @staticmethod
    def missing() -> str:
        for tool, path in (("sshd", "/usr/sbin/sshd"), ("ssh", shutil.which("ssh")),
                           ("ssh-keygen", shutil.which("ssh-keygen"))):
            if not path or not os.access(path, os.X_OK):
                return f"{tool} not installed"
        if os.geteuid() != 0:
            return "the private sshd runs as root (needs /run/sshd and root's login)"
        return ""

    def start(self) -> None:
        self.dir.mkdir(mode=0o700)
        host_key = self.dir / "host_ed25519"
        for key in (host_key, self.client_key):
            r = self.env.children.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "vbridge-e2e",
                                       "-f", str(key)], timeout=30)
            if r.returncode != 0:
                raise RuntimeError(f"ssh-keygen: {r.stderr.strip()}")
        (self.dir / "authorized_keys").write_text((self.dir / "client_ed25519.pub").read_text())
        # Debian's sshd refuses to start without its privilege separation directory.
        os.makedirs("/run/sshd", mode=0o755, exist_ok=True)
        self.port = free_tcp_port()
        config = self.dir / "sshd_config"
        config.write_text("\n".join([
            f"Port {self.port}",
            "ListenAddress 127.0.0.1",
            f"HostKey {host_key}",
            f"PidFile {self.dir / 'sshd.pid'}",
            f"AuthorizedKeysFile {self.dir / 'authorized_keys'}",
            "PermitRootLogin prohibit-password",
            "PubkeyAuthentication yes",
            "PasswordAuthentication no",
            "KbdInteractiveAuthentication no",
            "UsePAM no",
            "StrictModes no",
            "UseDNS no",
            "AllowTcpForwarding yes",
            "AllowStreamLocalForwarding yes",
            "StreamLocalBindUnlink yes",
            "X11Forwarding no",
            "PrintMotd no",
            "LogLevel ERROR",
            "",
        ]))
        check = self.env.children.run(["/usr/sbin/sshd", "-t", "-f", str(config)], timeout=30)
        if check.returncode != 0:
            raise RuntimeError(f"sshd -t: {check.stderr.strip()}")
        # sshd re-executes itself, so it is started by absolute path.
        self.proc = self.env.children.spawn(["/usr/sbin/sshd", "-D", "-e", "-f", str(config)], "sshd.log")
        wait_until(self._banner, 10.0, "sshd", (self.proc,))

    def _banner(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1.0) as s:
                return s.recv(4) == b"SSH-"
        except OSError:
            return False

    def forward_argv(self, spec: str) -> list[str]:
        return ["ssh", "-N", "-F", "/dev/null", "-p", str(self.port), "-i", str(self.client_key),
                "-o", "BatchMode=yes", "-o", "IdentitiesOnly=yes",
                "-o", "StrictHostKeyChecking=no", "-o", f"UserKnownHostsFile={self.known_hosts}",
                "-o", "GlobalKnownHostsFile=/dev/null", "-o", "ExitOnForwardFailure=yes",
                "-o", "StreamLocalBindUnlink=yes", "-o", "LogLevel=ERROR",
                "-L", spec, "root@127.0.0.1"]


class SshLPath(Path):
    """`ssh -N -L` through a private sshd on loopback (Lima/Colima forward the docker socket this way).
    All connections of a path share one ssh connection, multiplexed as ssh channels."""
    name = "ssh-L"

    def available(self) -> tuple[bool, str]:
        reason = SshServer.missing()
        return (not reason, reason)

    def start(self) -> None:
        ssh = self.env.ssh_server()
        if self.family == "unix":
            local = self.env.tmp / "ssh-L.sock"
            spec = f"{local}:{self.env.server_unix.removeprefix('unix:')}"
            self.client_addr = f"unix:{local}"
        else:
            port = free_tcp_port()
            spec = f"127.0.0.1:{port}:127.0.0.1:{self.env.server_port()}"
            self.client_addr = f"tcp:127.0.0.1:{port}"
        self._spawn(ssh.forward_argv(spec), f"ssh-L-{self.family}.log")
        self._wait_ready(20.0)


class VbridgePath(Path):
    """The bridge itself: client -> vbridge-host -> one transport (unix socket) -> vbridge-guest -> server.

    The unix family uses a unix-socket forward (host socket -> the server's socket); the tcp family a static
    port forward (a free loopback port -> the server's port). Both agents run in this network namespace, so
    the host agent does not follow the guest's listeners (they are the host's own).
    """
    name = "vbridge"
    binaries = ("vbridge-host", "vbridge-guest")

    def _find(self, binary: str) -> FsPath | None:
        if self.env.build_dir is None:
            return None
        for candidate in (self.env.build_dir / binary, self.env.build_dir / "host" / binary,
                          self.env.build_dir / "guest" / binary):
            if candidate.is_file() and os.access(candidate, os.X_OK):
                return candidate
        return None

    def available(self) -> tuple[bool, str]:
        if any(self._find(b) is None for b in self.binaries):
            return False, "vbridge agents not built"
        return True, ""

    def start(self) -> None:
        tmp = self.env.tmp / f"vbridge-{self.family}"
        tmp.mkdir(exist_ok=True)
        transport = tmp / "transport.sock"
        token = tmp / "token"
        token.unlink(missing_ok=True)
        token.touch(mode=0o600)
        token.write_text(os.urandom(32).hex())
        server_unix = self.env.server_unix.removeprefix("unix:")
        guest = [str(self._find("vbridge-guest")), "--listen", f"unix:{transport}", "--log-level", "warn",
                 "--token-file", str(token), "--allow-unix", server_unix, "--allow-ports"]
        if self.env.docker:
            guest += ["--docker-socket", server_unix]
        shm: list[str] = []
        if self.env.vbridge_shm:
            self.shm_file = FsPath(f"/dev/shm/vbridge-e2e-{os.getpid()}-{self.env.tmp.name}-{self.family}.shm")
            shm = ["--shm-file", str(self.shm_file)]
        guest += shm
        self._spawn(guest, f"vbridge-guest-{self.family}.log")
        wait_until(lambda: transport.exists(), 10, "vbridge-guest to listen")
        host = [str(self._find("vbridge-host")), "--transport", f"unix:{transport}", "--runtime-dir", str(tmp / "rt"),
                "--no-docker", "--no-follow-ports", "--log-level", "warn", "--token-file", str(token), *shm]
        if self.env.docker:
            # The bridged docker.sock itself, as the docker CLI on the host uses it.
            client = tmp / "docker.sock"
            host = [a for a in host if a != "--no-docker"] + ["--docker-sock", str(client), "--no-docker-context"]
            self.client_addr = f"unix:{client}"
        elif self.family == "unix":
            client = tmp / "client.sock"
            host += ["--forward-unix", f"{client}={server_unix}"]
            self.client_addr = f"unix:{client}"
        else:
            port = free_tcp_port()
            host += ["--publish", f"127.0.0.1:{port}:{self.env.server_port()}"]
            self.client_addr = f"tcp:127.0.0.1:{port}"
        self._spawn(host, f"vbridge-host-{self.family}.log")
        self._wait_ready()

    def stop(self) -> None:
        super().stop()
        if getattr(self, "shm_file", None) is not None:
            self.shm_file.unlink(missing_ok=True)


class ReferenceRelayPath(Path):
    """Yardsticks, run only when --paths names them: vbridge-reference-relay, the plainest relay there is
    (a thread per direction blocking in read/write, or in splice through a pipe), so the table shows what
    any relay with this many hops reaches on this machine, beside what vbridge reaches."""
    opt_in = True
    hops = 1
    mode = "copy"

    def _binary(self) -> FsPath | None:
        if self.env.build_dir is None:
            return None
        binary = self.env.build_dir / "bench" / "e2e" / "vbridge-reference-relay"
        return binary if binary.is_file() and os.access(binary, os.X_OK) else None

    def available(self) -> tuple[bool, str]:
        return (True, "") if self._binary() else (False, "vbridge-reference-relay not built")

    def start(self) -> None:
        upstream = self.env.server_addr(self.family)
        # The relay next to the server first, so the outer one never dials a missing socket.
        for hop in range(self.hops):
            if self.family == "unix":
                listen = f"unix:{self.env.tmp / f'{self.name}-{hop}.sock'}"
            else:
                listen = f"tcp:127.0.0.1:{free_tcp_port()}"
            self._spawn([str(self._binary()), self.mode, "--listen", listen, "--connect", upstream],
                        f"{self.name}-{self.family}-{hop}.log")
            upstream = listen
        self.client_addr = upstream
        self._wait_ready()


class RelayPath(ReferenceRelayPath):
    """One copying relay: the bytes are copied into and out of one process, as vbridge with shared memory
    copies them into the host agent and out of the guest agent."""
    name = "relay"


class Relay2Path(ReferenceRelayPath):
    """Two copying relays in a row: the copies of vbridge's two agents when bytes cross the transport."""
    name = "relay2"
    hops = 2


class SplicePath(ReferenceRelayPath):
    """One splicing relay: a relay that never copies (socket -> pipe -> socket by page reference)."""
    name = "splice"
    mode = "splice"


PATH_TYPES: list[type[Path]] = [DirectPath, Socat2Path, SshLPath, VbridgePath, RelayPath, Relay2Path, SplicePath]
