"""Fault injection: kill -9 the guest agent, the host agent or the transport while clients are busy.

Layout (the guest agent and its servers in their own network namespace, as in a VM):

  clients ─ docker.sock, -L echo.sock, 127.0.0.1:PORTS ─ vbridge-host ═ relay (socat) ═ vbridge-guest ─┬─ dockerd
                                                                                                       ├─ vbridge-soak serve
                                                                                                       └─ trickle server

Each fault, in rotation: SIGKILL the guest agent, the host agent, or the relay that carries the transport
(socat and its connection process). Before it, clients are mid-transfer on every kind of forward: a bulk
echo stream through the unix forward and one through a followed TCP port, a trickling stream (one line every
20 ms) through a followed port, `docker logs -f` of a container that ticks (every tenth fault: the docker CLI
is slow to start), and idle connections on the unix forward, the followed port and docker.sock. After it:

* every client sees EOF or an error within EOF_BOUND seconds -- nothing hangs;
* the killed process is restarted at once (as a supervisor would), and within RECOVERY_BOUND seconds of the
  kill a new connection works through every forward: docker.sock (GET /_ping), the unix forward, and both
  followed ports, which the host binds again from the guest's listener list.

VBRIDGE_FAULTS sets the number of faults (default 100). The figures go to bench/RESULTS.md (Reliability).

A second test stops both agents together (SIGTERM to the host agent, then to the guest agent), 20 times:
the host agent's GOAWAY may find the transport already gone, and it must still exit with status 0.
"""

from __future__ import annotations

import http.client
import os
import signal
import socket
import statistics
import struct
import sys
import threading
import time
import unittest

from agents import GuestAgent, HostAgent, binary
from fixtures import (Dockerd, FixtureError, FixtureTestCase, Netns, Process, WaitTimeout, descendants, docker_cli,
                      docker_env, docker_ping, make_busybox_image, require_dockerd, wait_for, wait_for_unix_socket)

IMAGE = "vbridge-busybox"
EOF_BOUND = 5.0  # seconds for every client to see EOF or an error after a kill
RECOVERY_BOUND = 5.0  # seconds from a kill until every forward carries a new connection
ECHO_HEADER = struct.pack("<IIQQ", 0x43454256, 0, 0, 0)  # vbridge-soak's plain echo ("VBEC")
DOCKER_EVERY = 10  # `docker logs -f` in one fault out of this many

# Writes "tick\n" every 20 ms to each client until it goes away.
TRICKLE_SERVER = """
import socket, sys, threading, time
s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", int(sys.argv[1])))
s.listen(64)
print("ready", flush=True)
def trickle(c):
    try:
        while True:
            c.sendall(b"tick\\n")
            time.sleep(0.02)
    except OSError:
        c.close()
while True:
    c, _ = s.accept()
    threading.Thread(target=trickle, args=(c,), daemon=True).start()
"""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def distribution(values: list[float]) -> str:
    ms = [v * 1000 for v in values]
    return f"p50 {percentile(ms, 0.5):.0f} ms, p99 {percentile(ms, 0.99):.0f} ms, max {max(ms):.0f} ms (n={len(ms)})"


class Client:
    """One client connection whose reader thread records when it sees EOF or an error.

    kind: "bulk" (echo: a writer thread sends 64 KiB chunks while the reader drains the echo), "trickle"
    (reads the server's lines), "idle" (one echo exchange, then nothing) or "docker-idle" (one kept-alive
    GET /_ping on docker.sock, then nothing).
    """

    CHUNK = b"\x5a" * 65536

    def __init__(self, name: str, kind: str, connect: tuple[int, object]) -> None:
        self.name, self.kind = name, kind
        self.received = 0
        self.ended_at: float | None = None
        self.how = ""
        self.stop = threading.Event()
        family, address = connect
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.settimeout(5)
        self.sock.connect(address)
        if kind in ("bulk", "idle"):
            self.sock.sendall(ECHO_HEADER)
        if kind == "idle":
            self.sock.sendall(b"ping")
            self._expect(b"ping")
        elif kind == "docker-idle":
            self.sock.sendall(b"GET /_ping HTTP/1.1\r\nHost: docker\r\n\r\n")
            reply = b""
            while not reply.endswith(b"OK"):
                chunk = self.sock.recv(4096)
                if not chunk:
                    raise FixtureError(f"{name}: docker.sock closed before answering /_ping")
                reply += chunk
        self.sock.settimeout(0.2)
        self.threads = [threading.Thread(target=self._read, daemon=True)]
        if kind == "bulk":
            self.threads.append(threading.Thread(target=self._write, daemon=True))
        for t in self.threads:
            t.start()

    def _expect(self, data: bytes) -> None:
        got = b""
        while len(got) < len(data):
            chunk = self.sock.recv(len(data) - len(got))
            if not chunk:
                raise FixtureError(f"{self.name}: EOF before the echo")
            got += chunk
        if got != data:
            raise FixtureError(f"{self.name}: echo {got!r}, expected {data!r}")

    def _end(self, how: str) -> None:
        if self.ended_at is None:
            self.ended_at = time.monotonic()
            self.how = how

    def _read(self) -> None:
        while not self.stop.is_set():
            try:
                chunk = self.sock.recv(262144)
            except (TimeoutError, socket.timeout):
                continue
            except OSError as e:
                self._end(f"error {e.__class__.__name__}")
                return
            if not chunk:
                self._end("EOF")
                return
            self.received += len(chunk)

    def _write(self) -> None:
        while not self.stop.is_set() and self.ended_at is None:
            try:
                self.sock.send(self.CHUNK)
            except (TimeoutError, socket.timeout):
                continue
            except OSError:
                return  # the reader reports the end

    @property
    def ended(self) -> bool:
        return self.ended_at is not None

    def close(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(5)
        self.sock.close()


class DockerLogs:
    """`docker logs -f` of the ticking container through the bridge; ends when the CLI exits."""

    def __init__(self, workdir, sock: str, cid: str) -> None:
        self.name, self.kind = "docker logs -f", "docker"
        self.process = Process(workdir, "logs", [docker_cli(), "logs", "-f", "--since", "1s", cid],
                               env=docker_env(sock))
        self.ended_at: float | None = None
        self.how = ""
        self.thread = threading.Thread(target=self._wait, daemon=True)
        self.thread.start()

    def _wait(self) -> None:
        rc = self.process.popen.wait()
        self.ended_at = time.monotonic()
        self.how = f"exit {rc}"

    @property
    def received(self) -> int:
        return self.process.stdout().count("tick")

    @property
    def ended(self) -> bool:
        return self.ended_at is not None

    def close(self) -> None:
        self.process.terminate(2)
        self.thread.join(5)


class FaultInjectionTest(FixtureTestCase):
    def test_kill9_guest_host_and_transport_mid_transfer(self) -> None:
        faults = int(os.environ.get("VBRIDGE_FAULTS", "100"))
        self.fd_baseline: dict[int, int] = {}
        self.fd_seen: dict[int, int] = {}
        require_dockerd()
        wd = self.workdir
        self.dockerd = Dockerd(wd, storage_driver=os.environ.get("VBRIDGE_DOCKER_STORAGE_DRIVER", "overlay2")).start()
        make_busybox_image(self.dockerd.docker)
        self.cid = self.dockerd.docker(["run", "-d", IMAGE, "sh", "-c", "while true; do echo tick; sleep 0.05; done"],
                                       check=True).stdout.strip()

        self.netns = Netns(wd, "guestns")
        self.echo_port, self.trickle_port = free_port(), free_port()
        echo_sock = wd.join("echo.sock")
        soak = self.netns.spawn(wd, "echo-server", [binary("vbridge-soak"), "serve", "--unix", echo_sock,
                                                    "--tcp", f"127.0.0.1:{self.echo_port}"])
        soak.wait_for_output('"listening"')
        trickle = self.netns.spawn(wd, "trickle-server", [sys.executable, "-c", TRICKLE_SERVER,
                                                          str(self.trickle_port)])
        trickle.wait_for_output("ready")

        self.guest_path = wd.join("guest.sock")
        self.relay_path = wd.join("relay.sock")
        self.host_echo = wd.join("echo-on-host.sock")
        self.guest = self.start_guest()
        self.relay = self.start_relay()
        self.host = self.start_host()
        self.wait_recovered(time.monotonic(), 30)

        kinds = ("guest", "host", "transport")
        recovery: dict[str, list[float]] = {k: [] for k in kinds}
        detection: dict[str, list[float]] = {k: [] for k in kinds}
        endings: dict[str, int] = {}
        started = time.monotonic()
        for i in range(faults):
            kind = kinds[i % 3]
            clients = self.start_clients(with_docker=i % DOCKER_EVERY == 0)
            try:
                self.wait_mid_transfer(clients)
                killed_at = self.inject(kind)
                try:
                    wait_for(lambda: all(c.ended for c in clients), EOF_BOUND, "every client to see EOF or an error")
                except WaitTimeout:
                    hung = [c.name for c in clients if not c.ended]
                    self.fail(f"fault {i} ({kind} killed): still open after {EOF_BOUND:g} s: {hung}\n{self.logs()}")
                detection[kind].append(max(c.ended_at for c in clients) - killed_at)
                for c in clients:
                    key = f"{c.kind}: {c.how}"
                    endings[key] = endings.get(key, 0) + 1
                self.restart(kind)
                recovery[kind].append(self.wait_recovered(killed_at, RECOVERY_BOUND, f"fault {i} ({kind} killed)"))
            finally:
                for c in clients:
                    c.close()
            self.check_quiescent(i, kind)
        elapsed = time.monotonic() - started

        every_recovery = [t for k in kinds for t in recovery[k]]
        every_detection = [t for k in kinds for t in detection[k]]
        print(f"\n{faults} faults in {elapsed:.0f} s: " + ", ".join(f"{len(recovery[k])} {k}" for k in kinds))
        print(f"clients ended: {sum(endings.values())}, by kind and how: {dict(sorted(endings.items()))}")
        print(f"all clients ended after the kill: {distribution(every_detection)}")
        print(f"every forward serving again after the kill: {distribution(every_recovery)}")
        for k in kinds:
            print(f"  {k} killed: clients ended {distribution(detection[k])}; recovered {distribution(recovery[k])}")
        print(f"descriptors of the agents between faults (per process, most seen): {self.fd_peaks()}")
        self.assertEqual(sum(len(v) for v in recovery.values()), faults)

    # ---- leaks ----

    def check_quiescent(self, i: int, kind: str) -> None:
        """With every client gone, the host has no stream left and neither agent holds more descriptors than
        the first time this same process was seen quiet: nothing leaks from one fault to the next."""

        def idle() -> bool:
            status = self.host.status()
            return status["agent"]["clients_open"] == 0 and status.get("mux", {}).get("streams", 0) == 0

        try:
            wait_for(idle, EOF_BOUND, "the host agent to have no stream left")
        except WaitTimeout:
            self.fail(f"fault {i} ({kind} killed): streams left open: {self.host.status()}")
        for name, process in (("host", self.host.process), ("guest", self.guest.process)):
            first = self.fd_baseline.setdefault(process.pid, fd_count(process.pid))
            try:
                wait_for(lambda: fd_count(process.pid) <= first, EOF_BOUND, f"the {name} agent's descriptors")
            except WaitTimeout:
                self.fail(f"fault {i} ({kind} killed): the {name} agent holds {fd_count(process.pid)} descriptors, "
                          f"{first} when first quiet")
            self.fd_seen[process.pid] = max(self.fd_seen.get(process.pid, 0), fd_count(process.pid))

    def fd_peaks(self) -> str:
        return f"{min(self.fd_seen.values())}-{max(self.fd_seen.values())} over {len(self.fd_seen)} processes"

    # ---- processes ----

    def start_guest(self) -> GuestAgent:
        return GuestAgent(self.workdir, docker_socket=self.dockerd.socket_path, netns=self.netns, name="guest",
                          listen=self.guest_path, extra=["--forward", f"echo={self.workdir.join('echo.sock')}"],
                          log_level="info").start()

    def start_relay(self) -> Process:
        relay = Process(self.workdir, "relay", ["socat", f"UNIX-LISTEN:{self.relay_path},fork,unlink-early",
                                                f"UNIX-CONNECT:{self.guest_path}"])
        wait_for(lambda: os.path.exists(self.relay_path) or relay.check_alive(), 10, "the relay to listen")
        return relay

    def start_host(self, wait_connected: bool = True) -> HostAgent:
        return HostAgent(self.workdir, "unix:" + self.relay_path, name="host", log_level="info",
                         extra=["-L", f"{self.host_echo}=echo"]).start(wait_connected=wait_connected)

    def inject(self, kind: str) -> float:
        """SIGKILLs the guest agent, the host agent, or the relay with its connection processes."""
        if kind == "guest":
            victims = [self.guest.process]
        elif kind == "host":
            victims = [self.host.process]
        else:
            victims = [self.relay]
        killed_at = time.monotonic()
        for process in victims:
            children = descendants(process.pid)
            process.send_signal(9)
            for pid in children:  # socat's forked connection process
                try:
                    os.kill(pid, 9)
                except ProcessLookupError:
                    pass
            process.wait_exit(5)
        return killed_at

    def restart(self, kind: str) -> None:
        if kind == "guest":
            self.guest = self.start_guest()
        elif kind == "host":
            self.host = self.start_host(wait_connected=False)
        else:
            self.relay = self.start_relay()
        for name, process in (("guest", self.guest.process), ("host", self.host.process), ("relay", self.relay)):
            if not process.alive():
                self.fail(f"the {name} process died after a {kind} fault\n{self.logs()}")

    def logs(self) -> str:
        return "\n".join(p.logs(3000) for p in (self.guest.process, self.host.process, self.relay))

    # ---- clients ----

    def start_clients(self, with_docker: bool) -> list:
        unix = (socket.AF_UNIX, self.host_echo)
        echo_tcp = (socket.AF_INET, ("127.0.0.1", self.echo_port))
        trickle_tcp = (socket.AF_INET, ("127.0.0.1", self.trickle_port))
        docker_sock = (socket.AF_UNIX, self.host.docker_socket)
        clients: list = []
        try:
            clients += [Client("bulk over the unix forward", "bulk", unix),
                        Client("bulk over a followed port", "bulk", echo_tcp),
                        Client("trickle over a followed port", "trickle", trickle_tcp),
                        Client("idle on docker.sock", "docker-idle", docker_sock)]
            clients += [Client(f"idle {n} over the unix forward", "idle", unix) for n in range(2)]
            clients += [Client(f"idle {n} over a followed port", "idle", echo_tcp) for n in range(2)]
            if with_docker:
                clients.append(DockerLogs(self.workdir, self.host.docker_socket, self.cid))
        except BaseException:
            for c in clients:
                c.close()
            raise
        return clients

    def wait_mid_transfer(self, clients: list) -> None:
        """Until each streaming client has received something (1 MiB for the bulk ones): they are mid-transfer."""

        def busy() -> bool:
            for c in clients:
                if c.ended:
                    raise FixtureError(f"{c.name} ended ({c.how}) before the fault\n{self.logs()}")
            need = {"bulk": 1 << 20, "trickle": 10, "docker": 3}
            return all(c.received >= need[c.kind] for c in clients if c.kind in need)

        wait_for(busy, 20, "the clients to be mid-transfer", ignore=())

    # ---- recovery ----

    def wait_recovered(self, since: float, bound: float, what: str = "startup") -> float:
        """Waits until a new connection works through every forward; returns the seconds since `since`."""
        left = set(("docker.sock", "unix forward", "followed echo port", "followed trickle port"))

        def probe(name: str) -> bool:
            if name == "docker.sock":
                return docker_ping(self.host.docker_socket, timeout=2)
            if name == "followed trickle port":
                with socket.create_connection(("127.0.0.1", self.trickle_port), timeout=2) as s:
                    return s.recv(5) == b"tick\n"
            family, address = ((socket.AF_UNIX, self.host_echo) if name == "unix forward"
                               else (socket.AF_INET, ("127.0.0.1", self.echo_port)))
            with socket.socket(family, socket.SOCK_STREAM) as s:
                s.settimeout(2)
                s.connect(address)
                s.sendall(ECHO_HEADER + b"hello")
                got = b""
                while len(got) < 5:
                    chunk = s.recv(5 - len(got))
                    if not chunk:
                        return False
                    got += chunk
                return got == b"hello"

        def all_serving() -> bool:
            for name in sorted(left):
                try:
                    if probe(name):
                        left.discard(name)
                except (OSError, http.client.HTTPException):
                    pass
            return not left

        deadline = since + bound
        try:
            wait_for(all_serving, max(0.0, deadline - time.monotonic()), "every forward to serve again", ignore=())
        except WaitTimeout:
            self.fail(f"{what}: not serving again within {bound:g} s of the kill: {sorted(left)}\n{self.logs()}")
        return time.monotonic() - since


STOP_ROUNDS = 20  # agent pairs in the stop-as-the-guest-vanishes test


class StopAsTheGuestVanishesTest(FixtureTestCase):
    def test_host_agent_told_to_stop_as_the_guest_vanishes_exits_cleanly(self) -> None:
        """SIGTERM to the host agent and then to the guest agent, back to back, as when a VM and its host agent
        are stopped together: whichever the host agent notices first, it exits with status 0."""
        wd = self.workdir
        for i in range(STOP_ROUNDS):
            guest = GuestAgent(wd, name=f"guest{i}", log_level="info").start()
            host = HostAgent(wd, "unix:" + guest.listen_path, name=f"host{i}", log_level="info").start()
            assert host.process is not None and guest.process is not None
            host.process.send_signal(signal.SIGTERM)
            guest.process.send_signal(signal.SIGTERM)
            rc = host.process.wait_exit(10)
            self.assertEqual(rc, 0, f"round {i}: the host agent exited with {rc}\n{host.process.logs()}")
            guest.process.wait_exit(5)


if __name__ == "__main__":
    unittest.main()
