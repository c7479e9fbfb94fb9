"""Issue 8, access and hostile input, against the real agents.

  tokens     on unix transports the guest agent requires the host's --token-file token; a wrong or missing
             one is refused with one log line on each side, and the active host connection is not touched
  hostile    vbridge-hostile plays a host that sends every malformed-frame class to a live guest agent: each
             case is answered (OPEN_FAIL, refusal, or a dropped connection with one log line) and the agent
             keeps serving; as a fake guest it does the same to a live host agent with a client stream open
             through its docker.sock
  access     docker.sock and status.sock are 0600 and check the peer's uid; forwarded ports bind loopback
"""

from __future__ import annotations

import os
import re
import socket
import stat
import subprocess

from agents import GuestAgent, HostAgent, binary
from fixtures import FixtureTestCase, Process, wait_for, wait_for_unix_socket

# Accepts and never reads: a guest socket whose stream runs out of credit.
STALL_SERVER = """
import socket, sys, time
s = socket.socket(socket.AF_UNIX)
s.bind(sys.argv[1])
s.listen(16)
print("ready", flush=True)
held = []
while True:
    held.append(s.accept()[0])
"""


def broken_stream_lines(peer: str) -> dict:
    """The one log line per case where `peer` broke a stream's credit or FIN rules."""
    said = rf"the {peer} broke the stream, reset it: "
    return {
        "data-beyond-window": re.compile(said + r"flow-control violation: stream \d+ sent \d+ bytes with only \d+ "
                                        r"bytes of credit"),
        "window-update-overflow": re.compile(said + r"flow-control violation: stream \d+ credit overflow"),
        "window-update-zero": re.compile(said + r"protocol error: WINDOW_UPDATE of 0 bytes on stream \d+"),
        "fin-twice": re.compile(said + r"protocol error: second FIN on stream \d+"),
    }


# Stream-level cases: refused or ignored, the connection goes on. Connection-level cases: the agent drops the
# connection and logs this (the tool reconnects). Each maps to the guest log line that names it.
STREAM_CASES = {
    "open-forbidden-unix": 'open /etc/shadow refused: target "/etc/shadow" is not allowed',
    "open-forbidden-port": "open tcp:1 refused: target tcp:1 is not allowed; start vbridge-guest with --allow-ports",
    "open-overlong-target": "(4001 bytes) is neither a forward name nor a socket path",
    "open-non-utf8-target": "open /tmp/\\xff\\xfe\\xc0.sock refused",
    "open-nul-in-target": "echo\\x00/../x\" (10 bytes) is neither a forward name",
    "open-traversal-target": 'open /tmp/../etc/x.sock refused: target "/tmp/../etc/x.sock" is not allowed',
    "rst-unknown-stream": None,
    "ports-from-host": None,
    "file-events-bad-paths": "file events: refused path '../escape'",
    "ping-flood": None,
    # A stream's own credit or FIN rules broken: that stream alone is reset.
    **broken_stream_lines("host"),
}
CONNECTION_CASES = {
    "unknown-frame-type": "host connection failed: protocol error: unknown frame type 42",
    "reserved-header-bytes": "host connection failed: protocol error: reserved header bytes are not zero",
    "data-over-max-frame": "length 2147483647: larger than the announced max frame size",
    "control-over-max-size": "length 67108864: larger than the control message limit",
    "truncated-header-then-close": None,  # the tool hangs up; "host closed the connection" at info
    "data-on-unknown-stream": "DATA frame on stream 1001 with length 8: stream was never opened",
    "data-ref-without-shared-memory": "with length 12: no shared memory was agreed in HELLO",
    "control-garbage": "host connection failed: protocol error: malformed CONTROL message on stream 0",
    "open-wrong-parity": "host connection failed: protocol error: OPEN with invalid stream id 2;",
    "open-duplicate-id": "host connection failed: protocol error: OPEN with invalid stream id 1;",
    "open-without-target": "host connection failed: protocol error: OPEN without a target",
    "second-hello": "HELLO was already received",
}


def count(pattern, text: str) -> int:
    if isinstance(pattern, re.Pattern):
        return len(pattern.findall(text))
    return text.count(pattern)


def echo_through(path: str, text: bytes) -> bytes:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as c:
        c.settimeout(10)
        c.connect(path)
        c.sendall(text)
        c.shutdown(socket.SHUT_WR)
        out = b""
        while chunk := c.recv(65536):
            out += chunk
    return out


class GuestServers:
    """A real socat echo server and a never-reading server on unix sockets in `workdir`."""

    def __init__(self, workdir) -> None:
        self.echo = workdir.join("echo.sock")
        self.stall = workdir.join("stall.sock")
        Process(workdir, "echo", ["socat", f"UNIX-LISTEN:{self.echo},fork", "EXEC:cat"])
        stall = Process(workdir, "stall", ["python3", "-c", STALL_SERVER, self.stall])
        wait_for_unix_socket(self.echo, 10)
        stall.wait_for_output("ready")


class HostileFramesTest(FixtureTestCase):
    def test_every_malformed_frame_class_is_answered_and_the_agent_keeps_serving(self) -> None:
        servers = GuestServers(self.workdir)
        share = self.workdir.mkdir("share")
        # What "../escape" would reach from the share: it must not be touched (ctime would move).
        outside = self.workdir.write("escape", "outside the share")
        before = os.stat(outside).st_ctime_ns
        guest = GuestAgent(self.workdir, extra=["--forward", f"echo={servers.echo}", "--forward",
                                                f"stall={servers.stall}", "--share", f"s={share}",
                                                "--no-ports"], log_level="info").start()
        r = subprocess.run([binary("vbridge-hostile"), "--transport", "unix:" + guest.listen_path, "--token-file",
                            guest.token_file, "--echo", "echo", "--stall", "stall", "--share", "s"],
                           capture_output=True, text=True, timeout=300)
        report = r.stdout
        self.assertEqual(r.returncode, 0, report + r.stderr + guest.process.logs())
        lines = {line.split()[0]: line for line in report.splitlines() if line and not line[0].isdigit()}
        for case in list(STREAM_CASES) + list(CONNECTION_CASES):
            self.assertIn(case, lines, report)
            self.assertTrue(lines[case].endswith(": PASS"), lines[case])
        for case in STREAM_CASES:
            self.assertIn("the good stream still echoes", lines[case])
        for case in CONNECTION_CASES:
            self.assertIn("a fresh session echoes", lines[case])

        log = guest.process.output()
        # One clear line per rejected case.
        for case, pattern in {**STREAM_CASES, **CONNECTION_CASES}.items():
            if pattern is not None:
                self.assertEqual(count(pattern, log), 1, f"{case}: {pattern!r} in the guest log:\n{log[-6000:]}")
        fatal = sum(1 for p in CONNECTION_CASES.values() if p is not None)
        self.assertEqual(log.count("host connection failed: "), fatal, log[-6000:])
        self.assertEqual(log.count("file events: refused path"), 5, log[-6000:])
        self.assertEqual(os.stat(outside).st_ctime_ns, before)
        self.assertTrue(guest.process.alive(), guest.process.logs())

        # A real host agent still gets a working bridge.
        forward = self.workdir.join("via-bridge.sock")
        host = HostAgent(self.workdir, "unix:" + guest.listen_path,
                         extra=["--no-docker", "--forward-unix", f"{forward}=echo"]).start()
        wait_for_unix_socket(forward, 10)
        self.assertEqual(echo_through(forward, b"still serving"), b"still serving")
        self.assertTrue(host.status()["connected"])


# What the host agent logs when a fake guest sends each connection-level case.
HOST_CONNECTION_CASES = {
    "unknown-frame-type": "protocol error: unknown frame type 42",
    "reserved-header-bytes": "protocol error: reserved header bytes are not zero",
    "control-over-max-size": "length 67108864: larger than the control message limit",
    "control-garbage": "protocol error: malformed CONTROL message on stream 0",
    "second-hello": "HELLO was already received",
    "data-over-max-frame": "length 2147483647: larger than the announced max frame size",
    "data-on-unknown-stream": "DATA frame on stream 1000 with length 8: stream was never opened",
    "data-ref-without-shared-memory": "with length 12: no shared memory was agreed in HELLO",
    "open-wrong-parity": "protocol error: OPEN with invalid stream id 1001",
    "open-duplicate-id": "protocol error: OPEN with invalid stream id 2\n",
    "open-without-target": "protocol error: OPEN without a target",
    "truncated-header-then-close": None,
}
HOST_STREAM_CASES = ["open-unexposed-name", "open-overlong-target", "open-nul-in-target", "rst-unknown-stream",
                     "ports-bad-contents", "file-events-from-guest", "ping-flood"]
# What the host agent logs, once, when a fake guest breaks one stream's credit or FIN rules.
HOST_BROKEN_STREAM_CASES = broken_stream_lines("guest")


class HostileGuestTest(FixtureTestCase):
    def test_a_fake_guest_cannot_break_the_host_agent(self) -> None:
        transport = self.workdir.join("fake-guest.sock")
        runtime = self.workdir.join("host-rt")
        tool = Process(self.workdir, "hostile", [binary("vbridge-hostile"), "--serve-guest", transport,
                                                 "--client-socket", os.path.join(runtime, "docker.sock")])
        tool.wait_for_output("listening on")
        host = HostAgent(self.workdir, "unix:" + transport, name="host").start()
        self.assertEqual(host.runtime_dir, runtime)
        self.assertEqual(tool.wait_exit(300), 0, tool.logs() + host.process.logs())
        report = tool.stdout()
        lines = {line.split()[0]: line for line in report.splitlines() if line and not line[0].isdigit()}
        for case in HOST_STREAM_CASES + list(HOST_BROKEN_STREAM_CASES) + list(HOST_CONNECTION_CASES):
            self.assertIn(case, lines, report)
            self.assertTrue(lines[case].endswith(": PASS"), lines[case])
        log = host.process.output()
        for case, pattern in HOST_BROKEN_STREAM_CASES.items():
            self.assertIn("the good stream still echoes", lines[case])
            self.assertEqual(count(pattern, log), 1, f"{case}: {pattern!r} in the host log:\n{log[-6000:]}")
        # One "lost" line per dropped connection (the client streams it cut say so at info level too).
        lost = "".join(line + "\n" for line in log.splitlines() if "lost the guest agent at" in line)
        for case, pattern in HOST_CONNECTION_CASES.items():
            if pattern is not None:
                self.assertEqual(count(pattern, lost), 1, f"{case}: {pattern!r} in the host log:\n{lost}")
        # The cases, then the tool's exit.
        self.assertEqual(lost.count("\n"), len(HOST_CONNECTION_CASES) + 1, lost)
        self.assertEqual(log.count('refused: host target "not-exposed" is not exposed'), 1, log[-6000:])
        self.assertTrue(host.process.alive(), host.process.logs())


class TokenTest(FixtureTestCase):
    def setUp(self) -> None:
        super().setUp()
        self.servers = GuestServers(self.workdir)
        self.guest = GuestAgent(self.workdir, extra=["--forward", f"echo={self.servers.echo}", "--no-ports"]).start()
        self.forward = self.workdir.join("via-bridge.sock")
        self.host = HostAgent(self.workdir, "unix:" + self.guest.listen_path,
                              extra=["--no-docker", "--forward-unix", f"{self.forward}=echo"]).start()
        wait_for_unix_socket(self.forward, 10)

    def test_wrong_token_is_refused_and_the_connected_host_keeps_its_bridge(self) -> None:
        wrong = self.workdir.write("wrong.token", "f" * 64, mode=0o600)
        intruder = HostAgent(self.workdir, "unix:" + self.guest.listen_path, name="intruder", token=wrong,
                             extra=["--no-docker"]).start(wait_connected=False)
        intruder.process.wait_for_output(f"refused the token of --token-file {wrong} (peer refused the handshake: "
                                         "bad token): give both agents the same token file; retrying")
        self.guest.process.wait_for_output("refused: bad token; it must send the token of this agent's --token-file")
        self.assertFalse(intruder.status()["connected"])
        self.assertIn("bad token", intruder.status()["last_error"])
        self.assertGreaterEqual(intruder.status()["agent"]["auth_failures"], 1)
        # Retried with backoff, logged once.
        wait_for(lambda: intruder.status()["agent"]["auth_failures"] >= 3, 10, "the intruder to retry")
        self.assertEqual(intruder.process.output().count("refused the token"), 1)
        # The real host was never replaced.
        self.assertEqual(echo_through(self.forward, b"still mine"), b"still mine")
        status = self.host.status()
        self.assertTrue(status["connected"])
        self.assertEqual(status["agent"]["reconnects"], 0)
        self.assertNotIn("replaces this one", self.guest.process.output())

    def test_host_without_a_token_is_told_to_pass_one(self) -> None:
        bare = HostAgent(self.workdir, "unix:" + self.guest.listen_path, name="bare", token=None,
                         extra=["--no-docker"]).start(wait_connected=False)
        bare.process.wait_for_output("refused this host agent (peer refused the handshake: bad token (the peer sent "
                                     "none)): it requires a token; pass --token-file")
        self.assertEqual(echo_through(self.forward, b"unaffected"), b"unaffected")

    def test_a_host_with_the_token_replaces_the_old_connection(self) -> None:
        second = HostAgent(self.workdir, "unix:" + self.guest.listen_path, name="second",
                           extra=["--no-docker"]).start()
        self.assertTrue(second.status()["connected"])
        self.guest.process.wait_for_output("a new host connection replaces this one")

    def test_agents_refuse_a_missing_or_readable_token_file(self) -> None:
        readable = self.workdir.write("readable.token", "a" * 64, mode=0o644)
        cases = [
            ([binary("vbridge-guest"), "--listen", "unix:" + self.workdir.join("g2.sock")],
             "lets any process that reaches it use the bridge: pass --token-file PATH"),
            ([binary("vbridge-guest"), "--listen", "tcp:127.0.0.1:0", "--token-file", readable],
             f"--token-file {readable} may be read by group or others (mode 0644); run chmod 600 {readable}"),
            ([binary("vbridge-host"), "--transport", "unix:" + self.guest.listen_path, "--runtime-dir",
              self.workdir.mkdir("rt3"), "--no-docker-context", "--token-file", readable],
             f"run chmod 600 {readable}"),
            ([binary("vbridge-host"), "--transport", "unix:" + self.guest.listen_path, "--runtime-dir",
              self.workdir.mkdir("rt4"), "--no-docker-context", "--token-file", self.workdir.join("absent")],
             "No such file or directory"),
        ]
        for argv, message in cases:
            r = subprocess.run(argv, capture_output=True, text=True, timeout=30)
            self.assertEqual(r.returncode, 2, r.stderr)
            self.assertIn(message, r.stderr)


class AccessTest(FixtureTestCase):
    def setUp(self) -> None:
        super().setUp()
        self.servers = GuestServers(self.workdir)
        self.guest = GuestAgent(self.workdir, extra=["--forward", f"echo={self.servers.echo}", "--no-ports",
                                                     "--allow-ports"]).start()

    def test_host_sockets_are_0600_and_check_the_peer_uid(self) -> None:
        host = HostAgent(self.workdir, "unix:" + self.guest.listen_path, extra=["--docker-target", "echo"]).start()
        for path in (host.docker_socket, host.status_socket):
            self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o600, path)
        self.assertEqual(stat.S_IMODE(os.stat(host.runtime_dir).st_mode), 0o700)
        if os.geteuid() != 0:
            self.skipTest("connecting as another uid needs root")
        # Open the folders and the socket to everyone, so that only the uid check stands in the way.
        os.chmod(self.workdir.path, 0o755)
        os.chmod(host.runtime_dir, 0o755)
        os.chmod(host.status_socket, 0o777)
        probe = ("import socket, sys\n"
                 "s = socket.socket(socket.AF_UNIX); s.settimeout(5); s.connect(sys.argv[1])\n"
                 "print(repr(s.recv(65536)))\n")
        r = subprocess.run(["python3", "-c", probe, host.status_socket], capture_output=True, text=True,
                           timeout=30, preexec_fn=lambda: (os.setgid(65534), os.setuid(65534)))
        self.assertEqual(r.stdout.strip(), "b''", r.stderr)  # closed without a word
        host.process.wait_for_output(f"refused a connection on {host.status_socket} from uid 65534")

    def test_forwarded_ports_bind_loopback_unless_told_otherwise(self) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        host = HostAgent(self.workdir, "unix:" + self.guest.listen_path,
                         extra=["--no-docker", "-p", f"{port}:{port + 1}"]).start()
        wait_for(lambda: tcp_listeners(port), 10, f"the host to listen on port {port}")
        self.assertEqual(tcp_listeners(port), {"127.0.0.1"}, host.process.logs())


def tcp_listeners(port: int) -> set[str]:
    """IPv4 addresses with a TCP socket listening on `port` (from /proc/net/tcp)."""
    found = set()
    with open("/proc/net/tcp") as f:
        for line in f.readlines()[1:]:
            fields = line.split()
            address, hex_port = fields[1].split(":")
            if int(hex_port, 16) == port and fields[3] == "0A":
                found.add(socket.inet_ntoa(bytes.fromhex(address)[::-1]))
    return found
