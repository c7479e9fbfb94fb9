"""Integrity soak: 64 concurrent checksummed streams of random sizes through the bridge for a bounded time.

Layout (the guest agent and the server in their own network namespace, as in a VM):

  vbridge-soak soak ─┬─ -L soak.sock (unix forward) ─┐                      ┌─ unix socket ─┐
                     └─ 127.0.0.1:PORT (followed) ───┴─ vbridge-host ═ vbridge-guest ─┴─ 127.0.0.1:PORT ┴─ vbridge-soak serve

Every stream sends a keyed pseudo-random byte stream of random size (0 to 64 MiB, log-uniform) and half-closes;
the server checks each byte on arrival and echoes it, the client checks the echo, and the server's trailer
says how much it received and how much differed. Eight of the streams read their echo at 1 MiB/s, so their
windows fill and stay full. While it runs, the resident memory of both agents is sampled; the peak must stay
below what the windows allow plus a fixed allowance for the pools and the agent itself. Per stream an agent
holds at most a window of bytes its local socket has not taken yet (its receive window); bytes it read and
has not sent yet are capped for all streams together (16 MiB, MuxConfig::max_buffered), where the peer's
windows alone would allow another window per stream (a guest at 624 MiB before the cap, 266 MiB after, in
300 s runs): streams x window + 2 x cap, mixed or not. A slow reader's
received bytes are slices of transport read blocks (1 MiB on the host, 256 KiB in the guest) that also carry
other streams' frames (64 KiB quanta); once an agent's pool holds more than 32 MiB, both agents move such
queued bytes into small blocks (compact_queue), which is what keeps the mixed soak inside the same bound
(without it the host peaked near 450 MiB). After the run no host pool buffer may still be in use but the
read arenas'.

VBRIDGE_SOAK_SECONDS sets the duration (default 300 under CI, 60 otherwise).
"""

from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time
import unittest

from agents import GuestAgent, HostAgent, binary
from fixtures import (FixtureTestCase, Netns, Process, WaitTimeout, build_dir, strict_mode, wait_for,
                      wait_for_tcp)

STREAMS = 64
SLOW_READERS = 8
WINDOW = 4 << 20  # the agents' default per-stream window (--window-kib 4096)
ALLOWANCE = 96 << 20  # pool caches (host 64 x 1 MiB, guest 64 x 256 KiB), buffer rings, arenas, the binary
# The connection-wide cap on bytes read and not yet sent (MuxConfig::max_buffered), counted twice: reads in
# flight when the cap fills, and read buffers partly filled.
QUEUED_CAP = 16 << 20
IDLE_IN_USE = 4  # host pool buffers still referenced once every stream is gone: read arenas' current blocks


def sanitizer() -> str | None:
    """The sanitizer the agents under test were built with (from the build's CMakeCache.txt), or None.

    Their resident memory then says little about the bridge (shadow memory, ASan's quarantine of freed
    blocks), so the memory bounds are reported but not asserted."""
    try:
        with open(os.path.join(build_dir(), "CMakeCache.txt")) as f:
            cache = f.read()
    except OSError:
        return None
    for option, name in (("VBRIDGE_SANITIZE", "ASan+UBSan"), ("VBRIDGE_TSAN", "TSan")):
        if f"{option}:BOOL=ON" in cache:
            return name
    return None


def soak_seconds() -> float:
    default = "300" if strict_mode() else "60"
    return float(os.environ.get("VBRIDGE_SOAK_SECONDS", default))


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def status_kib(pid: int, field: str) -> int:
    """A `VmRSS`/`VmHWM`-style field of /proc/PID/status, in KiB (0 if the process is gone)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


class RssSampler:
    """Samples VmRSS of some processes every `interval` seconds in a thread; keeps the peaks."""

    def __init__(self, pids: dict[str, int], interval: float = 0.25) -> None:
        self.pids = pids
        self.peak = {name: 0 for name in pids}
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(interval,), daemon=True)
        self._thread.start()

    def _run(self, interval: float) -> None:
        while not self._stop.wait(interval):
            self.sample()

    def sample(self) -> dict[str, int]:
        now = {name: status_kib(pid, "VmRSS") for name, pid in self.pids.items()}
        for name, kib in now.items():
            self.peak[name] = max(self.peak[name], kib)
        self.samples += 1
        return now

    def stop(self) -> dict[str, int]:
        self._stop.set()
        self._thread.join(5)
        self.sample()
        # VmHWM is the kernel's own high-water mark: it also catches a peak between two samples.
        for name, pid in self.pids.items():
            self.peak[name] = max(self.peak[name], status_kib(pid, "VmHWM"))
        return self.peak


def last_json(process: Process) -> dict:
    lines = [line for line in process.stdout().splitlines() if line.startswith("{")]
    return json.loads(lines[-1]) if lines else {}


def mib(kib: int) -> str:
    return f"{kib / 1024:.1f} MiB"


# Passes bytes both ways between a client and the server, but flips one byte of the client's data after the
# first MiB of each connection: the soak must notice.
CORRUPTING_RELAY = """
import socket, sys, threading
listen, target = sys.argv[1], sys.argv[2]
s = socket.socket(socket.AF_UNIX)
s.bind(listen)
s.listen(64)
print("ready", flush=True)
def pump(a, b, corrupt):
    seen = 0
    try:
        while chunk := a.recv(65536):
            if corrupt and seen <= (1 << 20) < seen + len(chunk):
                i = (1 << 20) - seen
                chunk = chunk[:i] + bytes([chunk[i] ^ 0x01]) + chunk[i + 1:]
            seen += len(chunk)
            b.sendall(chunk)
        b.shutdown(socket.SHUT_WR)
    except OSError:
        pass
while True:
    c, _ = s.accept()
    u = socket.socket(socket.AF_UNIX)
    u.connect(target)
    threading.Thread(target=pump, args=(c, u, True), daemon=True).start()
    threading.Thread(target=pump, args=(u, c, False), daemon=True).start()
"""


class SoakTest(FixtureTestCase):
    def test_checker_catches_a_flipped_byte(self) -> None:
        """The soak's checks can fail: one flipped bit per stream on the way in is counted and fails the run."""
        server_path, relay_path = self.workdir.join("server.sock"), self.workdir.join("relay.sock")
        server = Process(self.workdir, "server", [binary("vbridge-soak"), "serve", "--unix", server_path])
        server.wait_for_output('"listening"')
        relay = Process(self.workdir, "relay", [sys.executable, "-c", CORRUPTING_RELAY, relay_path, server_path])
        relay.wait_for_output("ready")
        soak = Process(self.workdir, "soak", [binary("vbridge-soak"), "soak", "--connect", "unix:" + relay_path,
                                              "--seconds", "2", "--streams", "4", "--max-size", str(8 << 20)])
        soak.wait_exit(60)
        result = last_json(soak)
        self.assertNotEqual(soak.returncode, 0, soak.logs())
        self.assertGreater(result.get("mismatched_bytes", 0), 0, soak.logs())

    def test_soak_loses_and_corrupts_nothing_and_memory_stays_within_the_windows(self) -> None:
        self.soak(STREAMS, SLOW_READERS, soak_seconds())

    def test_slow_readers_alone_hold_no_more_than_their_windows(self) -> None:
        """Only slow readers: their windows fill and stay full, and that is all the agents hold."""
        self.soak(SLOW_READERS, SLOW_READERS, 20)

    def soak(self, streams: int, slow: int, seconds: float) -> None:
        wd = self.workdir
        netns = Netns(wd, "guestns")
        port = free_port()
        server_path = wd.join("soak-server.sock")
        server = netns.spawn(wd, "soak-server", [binary("vbridge-soak"), "serve", "--unix", server_path,
                                                 "--tcp", f"127.0.0.1:{port}"])
        server.wait_for_output('"listening"')
        guest = GuestAgent(wd, netns=netns, extra=["--forward", f"soak={server_path}"], log_level="info").start()
        host_path = wd.join("soak.sock")
        host = HostAgent(wd, "unix:" + guest.listen_path, extra=["-L", f"{host_path}=soak"], log_level="info").start()
        wait_for_tcp("127.0.0.1", port, timeout=10)

        agents = {"host": host.process.pid, "guest": guest.process.pid}
        baseline = {name: status_kib(pid, "VmRSS") for name, pid in agents.items()}
        sampler = RssSampler(agents)
        soak = Process(wd, "soak", [binary("vbridge-soak"), "soak", "--connect", "unix:" + host_path,
                                    "--connect", f"tcp:127.0.0.1:{port}", "--seconds", str(seconds),
                                    "--streams", str(streams), "--slow-readers", str(slow),
                                    "--slow-rate", str(1 << 20), "--max-size", str(64 << 20),
                                    "--drain-seconds", "60"])
        try:
            soak.wait_exit(seconds + 120)
        finally:
            peak = sampler.stop()
        result = last_json(soak)
        # Each agent holds up to a window per stream received and not yet taken by its socket, and what the
        # cap lets all streams read ahead of the transport.
        bound_kib = (streams * WINDOW + 2 * QUEUED_CAP + ALLOWANCE) // 1024
        bound_text = (f"{mib(bound_kib)} = {streams} streams x {WINDOW >> 20} MiB window"
                      + f" + 2 x {QUEUED_CAP >> 20} MiB read ahead + {ALLOWANCE >> 20} MiB")
        try:
            wait_for(lambda: host.status()["buffers"]["in_use"] <= IDLE_IN_USE, 10, "the host's pool to drain")
        except WaitTimeout:
            pass  # asserted below, after the figures
        pool_after = host.status()["buffers"]

        print()
        print(f"soak: {result.get('seconds', 0):.0f} s, {streams} concurrent streams ({slow} reading at 1 MiB/s) "
              f"over a unix forward and a followed TCP port")
        print(f"  streams completed {result.get('streams_completed')} of {result.get('streams_started')} started "
              f"({result.get('slow_streams_completed')} slow), {result.get('bytes_verified', 0) / 1e9:.1f} GB "
              f"checked each way ({result.get('MBps_each_way', 0):.0f} MB/s)")
        print(f"  mismatched bytes {result.get('mismatched_bytes')}, streams failed {result.get('errors')}")
        for name in agents:
            print(f"  {name} agent RSS: {mib(baseline[name])} before, peak {mib(peak[name])} "
                  f"({sampler.samples} samples); bound {bound_text}")
        print(f"  host buffer pool after the run: {pool_after['in_use']} in use, {pool_after['live']} live "
              f"(with the cache), {mib(pool_after['bytes'] // 1024)}; slow readers' bytes moved out of shared "
              f"blocks: {host.status()['agent'].get('bytes_compacted', 0) / 1e6:.0f} MB")

        self.assertEqual(soak.returncode, 0, soak.logs())
        self.assertEqual(result["mismatched_bytes"], 0)
        self.assertEqual(result["errors"], 0, result.get("first_error"))
        if slow:
            self.assertGreater(result["slow_streams_completed"], 0, "a slow reader must finish too")
        self.assertLessEqual(pool_after["in_use"], IDLE_IN_USE, f"host buffers still in use after the run: {pool_after}")
        if sanitizer():
            print(f"  agents built with {sanitizer()}: memory bounds not asserted")
        else:
            for name in agents:
                self.assertLess(peak[name], bound_kib, f"{name} agent grew past its windows")
        host.process.check_alive("after the soak")
        guest.process.check_alive("after the soak")


if __name__ == "__main__":
    unittest.main()
