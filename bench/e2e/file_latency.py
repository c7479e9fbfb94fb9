#!/usr/bin/env python3
"""Host file change -> inotify event in the guest, through the real agents (needs root, FUSE, bindfs and
inotifywait; python3 standard library and tests/integration/fixtures.py).

The "guest" is a mount namespace in which a bindfs (FUSE) mount shows the host folder, as virtiofs, 9p and
sshfs do: host changes are visible there but raise no inotify event by themselves. vbridge-host watches the
host folder (--share), vbridge-guest replays the changes on the mount (--share). Each sample creates a file
in the host folder and times until `inotifywait -m -r` inside the guest prints a line naming it; an
inotifywait on the host folder itself, reading the same writes, is the floor ("direct").

    sudo python3 bench/e2e/file_latency.py --build-dir build [--count 200] [--json out.json]
"""

from __future__ import annotations

import os
import random
import select
import shutil
import subprocess
import sys
import time

sys.dont_write_bytecode = True  # no __pycache__ in the source tree
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bridge import Pair, fixtures, percentiles, tool_arguments, write_json  # noqa: E402

EVENTS = "create,modify,attrib,close_write,moved_to"
SAMPLE_TIMEOUT = 5.0  # seconds a sample may take before it counts as missed


def unavailable() -> str:
    """Why this benchmark cannot run here, or ""."""
    if os.geteuid() != 0:
        return "needs root (mount namespace, FUSE)"
    if not os.path.exists("/dev/fuse"):
        return "/dev/fuse is missing"
    for tool in ("bindfs", "inotifywait", "unshare", "nsenter", "mountpoint"):
        if shutil.which(tool, path=fixtures.SBIN_PATH) is None:
            return f"{tool} not found (apt-get install bindfs inotify-tools)"
    return ""


class Watcher:
    """inotifywait -m on a folder, its lines read from a pipe as they come."""

    def __init__(self, argv: list[str], name: str) -> None:
        self.name = name
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     start_new_session=True)
        fixtures.defer(self.stop)
        self.buf = b""
        deadline = time.monotonic() + 20
        err = b""
        while b"Watches established" not in err:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.proc.stderr], [], [], left)[0]:
                raise fixtures.FixtureError(f"{name}: inotifywait did not start: {err.decode(errors='replace')}")
            chunk = os.read(self.proc.stderr.fileno(), 4096)
            if not chunk:
                raise fixtures.FixtureError(f"{name}: inotifywait exited: {err.decode(errors='replace')}")
            err += chunk

    def wait_for(self, needle: bytes, deadline: float) -> int | None:
        """monotonic_ns when a line containing needle arrives (lines before it are dropped), None at deadline."""
        while True:
            while b"\n" in self.buf:
                line, self.buf = self.buf.split(b"\n", 1)
                if needle in line:
                    return self.seen
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.proc.stdout], [], [], left)[0]:
                return None
            chunk = os.read(self.proc.stdout.fileno(), 65536)
            self.seen = time.monotonic_ns()
            if not chunk:
                raise fixtures.FixtureError(f"{self.name}: inotifywait exited")
            self.buf += chunk

    def drain(self) -> None:
        while select.select([self.proc.stdout], [], [], 0)[0]:
            chunk = os.read(self.proc.stdout.fileno(), 65536)
            if not chunk:
                return
        self.buf = b""

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def measure(workdir: fixtures.Workdir, build_dir: str, count: int, step=None) -> dict:
    """Sets up the guest mount and the agents, then times `count` host file creations to inotify lines in the
    guest and on the host. Runs inside the caller's fixtures scope."""
    back = workdir.mkdir("back")
    mnt = workdir.mkdir("mnt")
    ns = fixtures.Netns(workdir, "filens")
    bindfs = ns.spawn(workdir, "bindfs", ["bindfs", "-f", back, mnt])

    def mounted() -> bool:
        bindfs.check_alive("before mounting")
        return ns.run(["mountpoint", "-q", mnt]).returncode == 0

    fixtures.wait_for(mounted, 10, "the bindfs mount in the guest")
    Pair(workdir, build_dir, "files", guest_args=["--share", f"home={mnt}", "--no-ports"],
         host_args=["--share", f"home={back}", "--no-docker", "--no-follow-ports"], netns=ns).start()
    inotify = ["inotifywait", "-m", "-r", "-e", EVENTS, "--format", "%w%f|%e"]
    guest = Watcher(ns.wrap([*inotify, mnt]), "inotifywait in the guest")
    host = Watcher([*inotify, back], "inotifywait on the host folder")

    bridged, direct, missed = [], [], 0
    for i in range(count):
        if step:
            step(f"file event {i + 1}/{count}")
        name = f"sample-{i}.txt"
        needle = f"/{name}|".encode()
        t0 = time.monotonic_ns()
        with open(os.path.join(back, name), "w") as f:
            f.write("x\n")
        deadline = time.monotonic() + SAMPLE_TIMEOUT
        h = host.wait_for(needle, deadline)
        g = guest.wait_for(needle, deadline)
        if g is None:
            missed += 1
        else:
            bridged.append((g - t0) / 1e6)
        if h is not None:
            direct.append((h - t0) / 1e6)
        # Let this file's events settle (the guest replays, the host sees the echo) before the next.
        time.sleep(0.01 + random.uniform(0, 0.01))
        guest.drain()
        host.drain()
    return {"count": count, "missed": missed, "vbridge_ms": percentiles(bridged), "direct_ms": percentiles(direct),
            "vbridge_samples_ms": [round(v, 3) for v in bridged]}


def main() -> int:
    args = tool_arguments("file_latency", __doc__,
                          lambda parser: parser.add_argument("--count", type=int, default=200), unavailable)
    with fixtures.scope():
        result = measure(fixtures.Workdir("vbfiles"), args.build_dir, args.count)
    for key, title in (("vbridge_ms", "host write -> guest inotifywait"), ("direct_ms", "host write -> host inotifywait")):
        r = result[key]
        print(f"{title} (n={r['n']}): p50 {r['p50']:.2f} ms  p90 {r['p90']:.2f} ms  p99 {r['p99']:.2f} ms  "
              f"max {r['max']:.2f} ms")
    print(f"missed: {result['missed']}")
    write_json(args.json, result)
    return 1 if result["missed"] else 0


if __name__ == "__main__":
    sys.exit(main())
