"""Unix socket forwards in both directions. The guest agent runs in its own network and mount namespace, and
each side's socket lives in a folder the other side cannot see (a tmpfs mounted only in the guest's mount
namespace), so each test first shows that the socket is out of reach without vbridge.

  host → guest: vbridge-host --forward-unix HOST_PATH=NAME, vbridge-guest --forward NAME=GUEST_PATH
  guest → host: vbridge-guest --reverse-unix GUEST_PATH=NAME, vbridge-host --expose-unix NAME=HOST_PATH
"""

from __future__ import annotations

import os
import socket
import sys

from agents import GuestAgent, HostAgent
from fixtures import FixtureTestCase, Netns, Process, wait_for, wait_for_unix_socket

# Reads to EOF, then answers how much it got and closes: the client's half-close must not stop the reply.
COUNT_SERVER = """
import socket, sys
s = socket.socket(socket.AF_UNIX)
s.bind(sys.argv[1])
s.listen(16)
print("ready", flush=True)
while True:
    c, _ = s.accept()
    total = 0
    while True:
        chunk = c.recv(65536)
        if not chunk:
            break
        total += len(chunk)
    c.sendall(b"got %d bytes" % total)
    c.close()
"""

# Sends N bytes, half-closes, prints the whole answer.
CLIENT = """
import socket, sys
c = socket.socket(socket.AF_UNIX)
c.settimeout(10)
c.connect(sys.argv[1])
c.sendall(b"x" * int(sys.argv[2]))
c.shutdown(socket.SHUT_WR)
out = b""
while True:
    chunk = c.recv(65536)
    if not chunk:
        break
    out += chunk
print(out.decode())
"""

PAYLOAD = 3 * 1024 * 1024 + 17


def client(path: str, size: int = PAYLOAD) -> str:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as c:
        c.settimeout(10)
        c.connect(path)
        c.sendall(b"x" * size)
        c.shutdown(socket.SHUT_WR)
        out = b""
        while chunk := c.recv(65536):
            out += chunk
    return out.decode()


class UnixForwardTest(FixtureTestCase):
    def setUp(self) -> None:
        super().setUp()
        self.netns = Netns(self.workdir, "guestns")
        # Folders the guest sees as its own empty tmpfs, hiding what the host has there.
        self.guest_dir = self.workdir.mkdir("guest-run")
        self.host_dir = self.workdir.mkdir("host-run")
        for d in (self.guest_dir, self.host_dir):
            self.netns.run(["mount", "-t", "tmpfs", "tmpfs", d], check=True)

    def test_host_socket_reaches_a_guest_socket(self) -> None:
        guest_path = os.path.join(self.guest_dir, "app.sock")
        server = self.netns.spawn(self.workdir, "guest-server", [sys.executable, "-c", COUNT_SERVER, guest_path])
        server.wait_for_output("ready")
        # The gap: the guest's socket does not exist in the host's view.
        self.assertFalse(os.path.exists(guest_path))
        guest = GuestAgent(self.workdir, netns=self.netns, extra=["--forward", f"app={guest_path}"]).start()
        host_path = self.workdir.join("app-on-host.sock")
        HostAgent(self.workdir, "unix:" + guest.listen_path, extra=["--forward-unix", f"{host_path}=app"]).start()
        self.assertEqual(client(host_path), f"got {PAYLOAD} bytes")
        self.assertEqual(client(host_path, 0), "got 0 bytes")

    def test_guest_socket_reaches_a_host_socket(self) -> None:
        host_path = os.path.join(self.host_dir, "svc.sock")
        server = Process(self.workdir, "host-server", [sys.executable, "-c", COUNT_SERVER, host_path])
        server.wait_for_output("ready")
        # The gap: inside the guest, the host's socket is hidden.
        gap = self.netns.run([sys.executable, "-c", CLIENT, host_path, "1"])
        self.assertNotEqual(gap.returncode, 0, gap.stdout)
        guest_path = os.path.join(self.guest_dir, "svc.sock")
        guest = GuestAgent(self.workdir, netns=self.netns, extra=["--reverse-unix", f"{guest_path}=svc"]).start()
        host = HostAgent(self.workdir, "unix:" + guest.listen_path, extra=["--expose-unix", f"svc={host_path}"]).start()
        r = self.netns.run([sys.executable, "-c", CLIENT, guest_path, str(PAYLOAD)])
        self.assertEqual(r.returncode, 0, r.stderr + guest.process.logs() + host.process.logs())
        self.assertEqual(r.stdout.strip(), f"got {PAYLOAD} bytes")
        r = self.netns.run([sys.executable, "-c", CLIENT, guest_path, "0"])
        self.assertEqual(r.stdout.strip(), "got 0 bytes", r.stderr)
        self.assertEqual(host.status()["exposed"]["opened"], 2)

    def test_guest_socket_for_a_name_the_host_does_not_expose_is_refused(self) -> None:
        guest_path = os.path.join(self.guest_dir, "other.sock")
        guest = GuestAgent(self.workdir, netns=self.netns, extra=["--reverse-unix", f"{guest_path}=other"]).start()
        host = HostAgent(self.workdir, "unix:" + guest.listen_path).start()
        r = self.netns.run([sys.executable, "-c", CLIENT, guest_path, "10"])
        self.assertEqual(r.stdout.strip(), "", "a refused stream ends the guest client's connection")
        host.process.wait_for_output('host target "other" is not exposed', timeout=5)
        wait_for(lambda: host.status()["exposed"]["refused"] == 1, 5, "the refusal in the host status")


if __name__ == "__main__":
    import unittest

    unittest.main()
