"""Port forwarding that follows the guest: the guest agent and its servers run in their own network
namespace, so a guest port is invisible on the host until vbridge forwards it. Each test first shows that."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import unittest

from agents import GuestAgent, HostAgent
from fixtures import FixtureTestCase, Netns, Process, WaitTimeout, descendants, wait_for
from test_soak import sanitizer

HTTP_PORT = 18080


def connects(host: str, port: int, family: int = socket.AF_INET) -> bool:
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.settimeout(1)
        try:
            s.connect((host, port))
            return True
        except OSError:
            return False


def udp_refused(port: int, host: str = "127.0.0.1") -> bool:
    """True if a datagram to host:port meets no socket there (the ICMP error comes back as ECONNREFUSED)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(1)
        s.connect((host, port))
        s.send(b"?")
        try:
            s.recv(16)
        except ConnectionRefusedError:
            return True
        except TimeoutError:
            pass
        return False


def curl(url: str, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(["curl", "-sS", "--max-time", "5", *extra, url], capture_output=True, text=True)


def host_ports(host: HostAgent) -> list[dict]:
    return host.status().get("ports", [])


class PortForwardTest(FixtureTestCase):
    def setUp(self) -> None:
        super().setUp()
        self.netns = Netns(self.workdir, "guestns")
        self.guest = GuestAgent(self.workdir, netns=self.netns).start()

    def start_host(self, *extra: str) -> HostAgent:
        self.host = HostAgent(self.workdir, "unix:" + self.guest.listen_path, extra=extra).start()
        return self.host

    def serve_http(self, bind: str, port: int = HTTP_PORT) -> Process:
        docroot = self.workdir.mkdir(f"www-{bind.replace(':', '_')}-{port}")
        with open(os.path.join(docroot, "index.html"), "w") as f:
            f.write("hello from the guest\n")
        return self.netns.spawn(self.workdir, "http", [sys.executable, "-m", "http.server", "--bind", bind, str(port)],
                                cwd=docroot)

    def stop_with_children(self, process: Process) -> None:
        # socat ... fork leaves a child per UDP peer behind its parent; they go by PID with it.
        for pid in descendants(process.pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        process.terminate()

    def wait_guest_listening(self, port: int, proto: str = "tcp") -> None:
        flag = "-ltn" if proto == "tcp" else "-lun"
        wait_for(lambda: f":{port} " in self.netns.run(["ss", "-H", flag]).stdout, 10, f"guest {proto} port {port}")

    def wait_forwarded(self, port: int, proto: str = "tcp") -> None:
        # Status, not a probe connection: a one-shot server (iperf3 -1, socat without fork) would take the
        # probe for its one client.
        wait_for(lambda: any(p["proto"] == proto and p["guest_port"] == port and p["ok"] for p in host_ports(self.host)),
                 5, f"the {proto} port {port} on the host")

    def test_http_v4_appears_and_disappears(self) -> None:
        server = self.serve_http("127.0.0.1")
        self.wait_guest_listening(HTTP_PORT)
        # The gap: the guest's port is not reachable from the host without vbridge.
        self.assertFalse(connects("127.0.0.1", HTTP_PORT))
        self.start_host()
        wait_for(lambda: curl(f"http://127.0.0.1:{HTTP_PORT}/").stdout == "hello from the guest\n", 5,
                 "the guest page through the forward")
        server.terminate()
        started = time.monotonic()
        wait_for(lambda: not connects("127.0.0.1", HTTP_PORT), 1.0, "the host port to go within 1 s")
        print(f"host port removed {1000 * (time.monotonic() - started):.0f} ms after the guest server stopped")

    def test_http_v6(self) -> None:
        self.serve_http("::1")
        self.wait_guest_listening(HTTP_PORT)
        self.assertFalse(connects("::1", HTTP_PORT, socket.AF_INET6))
        self.start_host()
        wait_for(lambda: curl(f"http://[::1]:{HTTP_PORT}/").stdout == "hello from the guest\n", 5,
                 "the guest page over IPv6")

    def test_dual_stack_wildcard_reaches_both_loopbacks(self) -> None:
        self.serve_http("::")
        self.wait_guest_listening(HTTP_PORT)
        self.assertFalse(connects("127.0.0.1", HTTP_PORT))
        self.assertFalse(connects("::1", HTTP_PORT, socket.AF_INET6))
        self.start_host()
        wait_for(lambda: curl(f"http://127.0.0.1:{HTTP_PORT}/").returncode == 0, 5, "IPv4 page")
        wait_for(lambda: curl(f"http://[::1]:{HTTP_PORT}/").returncode == 0, 5, "IPv6 page")

    def test_iperf3_tcp(self) -> None:
        port = 15201
        self.netns.spawn(self.workdir, "iperf3-server", ["iperf3", "-s", "-p", str(port), "-1"])
        self.wait_guest_listening(port)
        self.assertFalse(connects("127.0.0.1", port))  # the host's own loopback: the guest server never sees it
        self.start_host()
        self.wait_forwarded(port)
        r = subprocess.run(["iperf3", "-c", "127.0.0.1", "-p", str(port), "-t", "2", "-J"], capture_output=True,
                           text=True, timeout=60)
        self.assertEqual(r.returncode, 0, r.stdout[-2000:] + r.stderr)
        result = json.loads(r.stdout)
        mbps = result["end"]["sum_received"]["bits_per_second"] / 1e6
        self.assertGreater(mbps, 0)
        print(f"iperf3 TCP through the forward: {mbps:.0f} Mbit/s")

    def test_iperf3_udp(self) -> None:
        port = 15202
        self.netns.spawn(self.workdir, "iperf3-server", ["iperf3", "-s", "-p", str(port), "-1"])
        self.wait_guest_listening(port)
        self.assertFalse(connects("127.0.0.1", port))
        # iperf3 opens its UDP socket only once the test starts: publish the UDP port statically.
        self.start_host("--publish", f"127.0.0.1:{port}:{port}/udp")
        self.wait_forwarded(port)
        r = subprocess.run(["iperf3", "-c", "127.0.0.1", "-p", str(port), "-u", "-b", "200M", "-t", "2", "-J"],
                           capture_output=True, text=True, timeout=60)
        self.assertEqual(r.returncode, 0, r.stdout[-2000:] + r.stderr)
        end = json.loads(r.stdout)["end"]
        self.assertIn("sum", end, r.stdout[-1500:] + r.stderr + json.dumps(host_ports(self.host)) +
                      self.host.process.logs() + self.guest.process.logs())
        result = end["sum"]
        print(f"iperf3 UDP through the forward: {result['bits_per_second'] / 1e6:.0f} Mbit/s, "
              f"lost {result['lost_percent']:.2f}%")
        self.assertGreater(result["packets"], 0)

    def test_udp_echo_keeps_datagrams_whole_and_in_order(self) -> None:
        port = 15300
        echo = self.netns.spawn(self.workdir, "socat-echo",
                                ["socat", "-b65536", f"UDP4-LISTEN:{port},fork,reuseaddr", "PIPE"])
        self.addCleanup(self.stop_with_children, echo)
        self.wait_guest_listening(port, "udp")
        self.assertTrue(udp_refused(port))
        self.start_host()
        wait_for(lambda: any(p["proto"] == "udp" and p["guest_port"] == port and p["ok"] for p in host_ports(self.host)),
                 5, "the UDP port on the host")
        sizes = [1, 2, 64, 512, 1400, 1500, 4096, 9000, 16384, 32768, 50000, 65000]
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.settimeout(5)
            s.connect(("127.0.0.1", port))
            for i, size in enumerate(sizes):
                payload = bytes([i % 251]) * size
                s.send(payload)
                echoed = s.recv(70000)
                self.assertEqual(len(echoed), size, f"datagram {i} of {size} bytes came back as {len(echoed)}")
                self.assertEqual(echoed, payload)

    def test_udp_over_ipv6(self) -> None:
        port = 15301
        echo = self.netns.spawn(self.workdir, "socat-echo6",
                                ["socat", "-b65536", f"UDP6-LISTEN:{port},fork,reuseaddr,ipv6only=1", "PIPE"])
        self.addCleanup(self.stop_with_children, echo)
        self.wait_guest_listening(port, "udp")
        # The gap: nothing answers on the host's own ::1.
        self.assertTrue(udp_refused(port, "::1"))
        self.start_host()
        wait_for(lambda: any(p["proto"] == "udp" and p["host"] == f"[::1]:{port}" and p["ok"]
                             for p in host_ports(self.host)), 5, "the UDP port on the host's ::1")
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as s:
            s.settimeout(5)
            s.connect(("::1", port))
            for i, size in enumerate([1, 1400, 9000, 65000]):
                payload = bytes([i + 1]) * size
                s.send(payload)
                self.assertEqual(s.recv(70000), payload, f"datagram {i} of {size} bytes over IPv6")

    def test_thousand_ports_converge(self) -> None:
        script = (
            "import socket, sys\n"
            "socks = []\n"
            "for p in range(20000, 21000):\n"
            "    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n"
            "    s.bind(('127.0.0.1', p)); s.listen(1); socks.append(s)\n"
            "print('open', flush=True)\n"
            "sys.stdin.readline()\n"
            "for s in socks: s.close()\n"
            "print('closed', flush=True)\n"
            "sys.stdin.readline()\n"
        )
        self.start_host()
        proc = subprocess.Popen(self.netns.wrap([sys.executable, "-c", script]), stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, text=True)
        self.addCleanup(proc.kill)
        self.assertEqual(proc.stdout.readline().strip(), "open")

        def forwarded() -> set[int]:
            return {p["guest_port"] for p in host_ports(self.host) if p["proto"] == "tcp" and p["ok"]
                    and 20000 <= p["guest_port"] < 21000}

        wait_for(lambda: len(forwarded()) == 1000, 10, "all 1,000 ports on the host")
        proc.stdin.write("\n")
        proc.stdin.flush()
        self.assertEqual(proc.stdout.readline().strip(), "closed")
        wait_for(lambda: len(forwarded()) == 0, 10, "all 1,000 ports gone from the host")
        self.assertFalse(connects("127.0.0.1", 20500))

    def test_port_the_host_cannot_bind_is_reported(self) -> None:
        port = 15400
        blocker = socket.socket()
        blocker.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        blocker.bind(("127.0.0.1", port))
        blocker.listen(1)
        self.addCleanup(blocker.close)
        self.serve_http("127.0.0.1", port)
        self.wait_guest_listening(port)
        self.start_host()

        def reported() -> dict | None:
            for p in host_ports(self.host):
                if p["guest_port"] == port and not p["ok"]:
                    return p
            return None

        entry = wait_for(reported, 5, "the unbindable port in the status")
        self.assertIn("in use", entry["error"])
        self.host.process.wait_for_output(f"guest port {port} not forwarded", timeout=5)

    def test_guest_listener_vanishing_mid_connection(self) -> None:
        port = 15500
        server = self.netns.spawn(self.workdir, "sink", ["socat", f"TCP-LISTEN:{port},bind=127.0.0.1", "PIPE"])
        self.wait_guest_listening(port)
        self.assertFalse(connects("127.0.0.1", port))
        self.start_host()
        self.wait_forwarded(port)
        with socket.create_connection(("127.0.0.1", port), timeout=5) as c:
            c.sendall(b"ping\n")
            self.assertEqual(c.recv(5), b"ping\n")
            server.kill9()
            # The client sees the end of the stream instead of hanging.
            data = b"x"
            deadline = time.monotonic() + 5
            while data and time.monotonic() < deadline:
                try:
                    data = c.recv(100)
                except (ConnectionResetError, TimeoutError):
                    break
        self.assertTrue(self.host.process.alive())
        # And the bridge keeps serving.
        self.serve_http("127.0.0.1", port + 1)
        wait_for(lambda: curl(f"http://127.0.0.1:{port + 1}/").returncode == 0, 5, "a new forward after the failure")

    def test_udp_flood_is_bounded(self) -> None:
        port = 15600
        # A guest UDP socket that never reads: the forward must drop, count, and stay small.
        self.netns.spawn(self.workdir, "udp-sink", [sys.executable, "-c",
                         f"import socket,time; s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM); "
                         f"s.bind(('127.0.0.1',{port})); time.sleep(600)"])
        self.wait_guest_listening(port, "udp")
        self.assertTrue(udp_refused(port))
        self.start_host()
        wait_for(lambda: any(p["guest_port"] == port and p["ok"] for p in host_ports(self.host)), 5, "UDP forward")
        payload = b"f" * 1400
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            deadline = time.monotonic() + 3
            sent = 0
            while time.monotonic() < deadline:
                for _ in range(100):
                    try:
                        s.sendto(payload, ("127.0.0.1", port))
                        sent += 1
                    except OSError:
                        pass
        rss_kib = int(open(f"/proc/{self.host.process.pid}/status").read().split("VmRSS:")[1].split()[0])
        entry = next(p for p in host_ports(self.host) if p["guest_port"] == port)
        print(f"UDP flood: {sent} datagrams sent, host agent RSS {rss_kib} KiB, forward counters {entry.get('udp')}")
        if sanitizer():
            print(f"  agents built with {sanitizer()}: memory bound not asserted")
        else:
            self.assertLess(rss_kib, 64 * 1024)
        self.assertTrue(self.host.process.alive())
        self.assertTrue(self.guest.process.alive())


if __name__ == "__main__":
    unittest.main()
