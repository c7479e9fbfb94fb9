"""Bytes arrive whole and in order on every data path of the agents: through memory (the default: reads into
pool buffers, gather writes), through pipes (--splice: bulk transfers move by splice(2), switching back
to memory for small pieces and whenever a pipe is full), and through shared memory (--shm-file: bytes read
into a region both agents map travel as references, and as copies whenever the region is full). Several streams run at once with writes of mixed
sizes, so the two kinds of bytes interleave inside one stream and frames of several streams interleave on
the transport; every byte is checked with SHA-256 both ways.
"""

from __future__ import annotations

import hashlib
import os
import random
import socket
import sys
import threading

from agents import GuestAgent, HostAgent
from fixtures import FixtureTestCase, Process, wait_for

# Per connection: a line "SIZE SEED", then the client's bytes until EOF. Answers the SHA-256 of what came as
# a line, then SIZE bytes of a stream seeded with SEED, written in pieces of mixed sizes, then closes.
CHECK_SERVER = r"""
import hashlib, random, socket, sys, threading
PIECES = (1, 100, 4096, 65536, 300000, 1 << 20)
def serve(c):
    f = c.makefile("rb")
    size, seed = map(int, f.readline().split())
    h = hashlib.sha256()
    while chunk := f.read1(1 << 20):
        h.update(chunk)
    c.sendall(h.hexdigest().encode() + b"\n")
    rng = random.Random(seed)
    left = size
    while left:
        n = min(left, rng.choice(PIECES))
        c.sendall(rng.randbytes(n))
        left -= n
    c.close()
s = socket.socket(socket.AF_UNIX)
s.bind(sys.argv[1])
s.listen(64)
print("ready", flush=True)
while True:
    c, _ = s.accept()
    threading.Thread(target=serve, args=(c,), daemon=True).start()
"""

PIECES = (1, 100, 4096, 65536, 300000, 1 << 20)
STREAM_BYTES = 24 * 1024 * 1024 + 13
STREAMS = 4


def expected_reply(size: int, seed: int) -> str:
    rng = random.Random(seed)
    h = hashlib.sha256()
    left = size
    while left:
        n = min(left, rng.choice(PIECES))
        h.update(rng.randbytes(n))
        left -= n
    return h.hexdigest()


def exchange(path: str, seed: int) -> tuple[str, str, str, str]:
    """Sends STREAM_BYTES in mixed pieces and reads the reply; returns (sent, echoed digest, got, expected)."""
    rng = random.Random(seed ^ 0x5EED)
    sent = hashlib.sha256()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as c:
        c.settimeout(60)
        c.connect(path)
        c.sendall(f"{STREAM_BYTES} {seed}\n".encode())
        left = STREAM_BYTES
        while left:
            piece = rng.randbytes(min(left, rng.choice(PIECES)))
            sent.update(piece)
            c.sendall(piece)
            left -= len(piece)
        c.shutdown(socket.SHUT_WR)
        f = c.makefile("rb")
        echoed = f.readline().decode().strip()
        got = hashlib.sha256()
        while chunk := f.read1(1 << 20):
            got.update(chunk)
    return sent.hexdigest(), echoed, got.hexdigest(), expected_reply(STREAM_BYTES, seed)


class DataPathTest(FixtureTestCase):
    def run_streams(self, agent_flags: list[str], host_flags: list[str] | None = None) -> tuple[GuestAgent, HostAgent]:
        server_path = self.workdir.join("check.sock")
        server = Process(self.workdir, "check-server", [sys.executable, "-c", CHECK_SERVER, server_path])
        server.wait_for_output("ready")
        guest = GuestAgent(self.workdir, extra=["--allow-unix", server_path, *agent_flags]).start()
        client_path = self.workdir.join("client.sock")
        host = HostAgent(self.workdir, "unix:" + guest.listen_path,
                         extra=["--no-docker", "--forward-unix", f"{client_path}={server_path}",
                                *(agent_flags if host_flags is None else host_flags)]).start()
        results: dict[int, tuple[str, str, str, str] | BaseException] = {}

        def run(seed: int) -> None:
            try:
                results[seed] = exchange(client_path, seed)
            except BaseException as e:  # reported below, with the agents' logs
                results[seed] = e

        threads = [threading.Thread(target=run, args=(seed,)) for seed in range(1, STREAMS + 1)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(180)
        logs = guest.process.logs() + host.process.logs()
        for seed in range(1, STREAMS + 1):
            r = results.get(seed)
            self.assertNotIsInstance(r, BaseException, f"stream {seed}: {r}\n{logs}")
            self.assertIsNotNone(r, f"stream {seed} did not finish\n{logs}")
            sent, echoed, got, expected = r
            self.assertEqual(echoed, sent, f"stream {seed}: host → guest bytes differ\n{logs}")
            self.assertEqual(got, expected, f"stream {seed}: guest → host bytes differ\n{logs}")
        guest.process.check_alive("after the transfers")
        host.process.check_alive("after the transfers")
        return guest, host

    def shm_path(self, name: str, size: int = 0) -> str:
        path = f"/dev/shm/vbridge-test-{os.getpid()}-{name}.shm"
        self.addCleanup(lambda: os.path.exists(path) and os.unlink(path))
        if size:
            with open(path, "wb") as f:
                f.truncate(size)
        return path

    def shared_status(self, host: HostAgent) -> dict:
        shm = host.status()["shared_memory"]
        # Every loan comes back once the bytes are written out, both ways.
        wait_for(lambda: host.status()["shared_memory"]["loans_outstanding"] == 0 and
                 host.status()["shared_memory"]["borrowed_bytes"] == 0, 10, "every shared-memory loan to return")
        return shm

    def test_memory_path_keeps_every_byte(self) -> None:
        guest, host = self.run_streams([])
        self.assertNotIn("moving bytes by splice", guest.process.logs() + host.process.logs())

    def test_splice_path_keeps_every_byte(self) -> None:
        guest, host = self.run_streams(["--splice"])
        # Both directions really took the pipe path.
        self.assertIn("moving bytes by splice", host.process.logs())
        self.assertIn("moving bytes by splice", guest.process.logs())

    def test_shared_memory_path_keeps_every_byte(self) -> None:
        guest, host = self.run_streams(["--shm-file", self.shm_path("ref")])
        shm = self.shared_status(host)
        self.assertTrue(shm["active"], shm)
        # Nearly all bulk bytes went by reference, both ways (small reads may land in a block's short tail).
        self.assertGreater(shm["bytes_out_by_ref"], STREAMS * STREAM_BYTES // 2, shm)
        self.assertGreater(shm["bytes_in_by_ref"], STREAMS * STREAM_BYTES // 2, shm)
        self.assertIn("travel by reference through shared memory", host.process.logs())
        self.assertIn("travel by reference through shared memory", guest.process.logs())

    def test_full_shared_memory_mixes_references_and_copies(self) -> None:
        # 4 MiB: one 1 MiB block for the host, eight 256 KiB blocks for the guest's 32 read buffers.
        path = self.shm_path("small", 4 << 20)
        guest, host = self.run_streams(["--shm-file", path], host_flags=["--shm-file", path, "--shm-size-mib", "4"])
        shm = self.shared_status(host)
        self.assertTrue(shm["active"], shm)
        self.assertGreater(shm["misses"], 0, shm)
        self.assertGreater(shm["bytes_out_by_ref"], 0, shm)
        self.assertLess(shm["bytes_out_by_ref"], STREAMS * STREAM_BYTES, shm)

    def test_different_regions_fall_back_to_copying(self) -> None:
        guest_file, host_file = self.shm_path("guest-side"), self.shm_path("host-side")
        guest, host = self.run_streams(["--shm-file", guest_file], host_flags=["--shm-file", host_file])
        shm = host.status()["shared_memory"]
        self.assertFalse(shm["active"], shm)
        self.assertEqual(shm["bytes_out_by_ref"], 0, shm)
        # The guest made its file itself and no host agent set it up; the host hears of no region.
        self.assertIn("no host agent has set it up", guest.process.logs())
        self.assertIn("is unused: the peer agent announced none", host.process.logs())


if __name__ == "__main__":
    import unittest

    unittest.main()
