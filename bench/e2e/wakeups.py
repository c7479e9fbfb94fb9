#!/usr/bin/env python3
"""Wakeups and CPU per byte of every process on the vbridge path, for 1 and for N bulk streams.

On two cores a bulk transfer through vbridge is bounded by CPU, and much of that CPU goes into waking
processes up: each time a reader sleeps and is woken, and each time a busy thread is preempted. This starts
a private agent pair with shared memory (as `vbridge up` sets them up) in front of vbridge-loadgen's server
on a unix socket, runs `vbridge-loadgen throughput` through it, and, over a window in the middle of the run,
reads every thread of the host agent, the guest agent, the server and the client from /proc: voluntary
context switches (the thread slept and was woken), involuntary ones (it was preempted) and CPU time, each
per MB moved. With --baseline-build, a second build's agents take turns with the first, round by round;
with --relay2, two vbridge-reference-relay copy relays in a row (the plainest relay of the same shape, a
thread per direction) take their turn as well, in the agents' columns: the one next to the client under
"host", the one next to the server under "guest".

    python3 bench/e2e/wakeups.py [--build-dir build] [--baseline-build DIR ...] [--relay2] [--streams 1,8]
                                 [--rounds 5]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import relay_cpu  # noqa: E402  (the private pair's setup)

REPO = Path(__file__).resolve().parents[2]
RUN_SECONDS = 3.0
WINDOW = (0.6, 2.4)  # seconds into the run: past the streams' start, before their end


def sample(pid: int) -> tuple[int, int, float]:
    """Voluntary and involuntary context switches summed over `pid`'s live threads, and its CPU seconds."""
    voluntary = involuntary = 0
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except FileNotFoundError:
        return 0, 0, 0.0
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/status", encoding="ascii") as f:
                for line in f:
                    if line.startswith("voluntary_ctxt_switches"):
                        voluntary += int(line.split()[1])
                    elif line.startswith("nonvoluntary_ctxt_switches"):
                        involuntary += int(line.split()[1])
        except FileNotFoundError:
            continue
    try:
        cpu = relay_cpu.cpu_seconds(pid)
    except FileNotFoundError:
        cpu = 0.0
    return voluntary, involuntary, cpu


def measure(loadgen: Path, client: Path, pids: dict[str, int], streams: int) -> dict:
    proc = subprocess.Popen([str(loadgen), "throughput", "--connect", f"unix:{client}", "--streams", str(streams),
                             "--seconds", str(RUN_SECONDS)], stdout=subprocess.PIPE, text=True)
    watched = {**pids, "client": proc.pid}
    time.sleep(WINDOW[0])
    before = {name: sample(pid) for name, pid in watched.items()}
    time.sleep(WINDOW[1] - WINDOW[0])
    after = {name: sample(pid) for name, pid in watched.items()}
    out, _ = proc.communicate(timeout=RUN_SECONDS * 4 + 30)
    result = json.loads(out.strip().splitlines()[-1])["forward"]
    megabytes = result["MBps"] * (WINDOW[1] - WINDOW[0])  # the rate is steady inside the window
    row = {"MBps": result["MBps"]}
    for name in watched:
        (v0, i0, c0), (v1, i1, c1) = before[name], after[name]
        row[name] = {"sleeps_per_MB": (v1 - v0) / megabytes, "preemptions_per_MB": (i1 - i0) / megabytes,
                     "cpu_s_per_GB": (c1 - c0) / megabytes * 1000}
    return row


def relay2(bench: relay_cpu.Bench) -> tuple[Path, tuple[subprocess.Popen, subprocess.Popen]]:
    """Two reference copy relays in a row in front of the server: (client address, (inner, outer))."""
    binary = bench.build / "bench" / "e2e" / "vbridge-reference-relay"
    if not binary.is_file():
        sys.exit(f"wakeups: {binary} is missing; build it (cmake --build {bench.build})")
    inner_sock, outer_sock = bench.tmp / "relay-inner.sock", bench.tmp / "relay-outer.sock"
    inner = bench.spawn([str(binary), "copy", "--listen", f"unix:{inner_sock}", "--connect",
                         f"unix:{bench.server_sock}"], "relay-inner")
    relay_cpu.wait_for_socket(inner_sock, inner, "vbridge-reference-relay")
    outer = bench.spawn([str(binary), "copy", "--listen", f"unix:{outer_sock}", "--connect", f"unix:{inner_sock}"],
                        "relay-outer")
    relay_cpu.wait_for_socket(outer_sock, outer, "vbridge-reference-relay")
    return outer_sock, (inner, outer)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--build-dir", default=str(REPO / "build"))
    ap.add_argument("--baseline-build", metavar="DIR", action="append", default=[],
                    help="another build's agents, interleaved round by round (may be repeated)")
    ap.add_argument("--relay2", action="store_true",
                    help="two vbridge-reference-relay copy relays in a row take turns too (the yardstick)")
    ap.add_argument("--streams", default="1,8", help="comma-separated stream counts")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--json", metavar="FILE")
    args = ap.parse_args()
    builds = {f"baseline{i + 1}" if len(args.baseline_build) > 1 else "baseline": Path(d).resolve()
              for i, d in enumerate(args.baseline_build)}
    builds["build"] = Path(args.build_dir).resolve()
    if args.relay2:
        builds["relay2"] = builds["build"]
    counts = [int(n) for n in args.streams.split(",")]
    rows: dict[str, dict[int, list[dict]]] = {label: {n: [] for n in counts} for label in builds}
    for r in range(args.rounds):
        for label, build in builds.items():
            with tempfile.TemporaryDirectory(prefix="vbridge-wakeups-") as tmp:
                bench = relay_cpu.Bench(build, Path(tmp))
                shm = Path(f"/dev/shm/vbridge-wakeups-{os.getpid()}.shm")
                try:
                    if label == "relay2":
                        client, (guest, host) = relay2(bench)
                    else:
                        client, (guest, host) = bench.vbridge("pair", ["--shm-file", str(shm)])
                    pids = {"host": host.pid, "guest": guest.pid, "server": bench.server.pid}
                    for n in counts:
                        print(f"round {r + 1}/{args.rounds}  {label}  {n} stream(s)", file=sys.stderr)
                        rows[label][n].append(measure(bench.loadgen, client, pids, n))
                finally:
                    bench.close()
                    shm.unlink(missing_ok=True)
    print(f"medians of {args.rounds} rounds, {RUN_SECONDS:g} s runs, window {WINDOW[0]:g}-{WINDOW[1]:g} s; "
          "sleeps and preemptions per MB, CPU seconds per GB")
    for label, build in builds.items():
        print(f"{label}: two reference copy relays (host: next to the client, guest: next to the server)"
              if label == "relay2" else f"{label}: {build}")
    print(f"{'agents':9} {'streams':>7} {'MB/s':>6}  " +
          "  ".join(f"{p:>19}" for p in ("host", "guest", "server", "client")))
    for label, by_count in rows.items():
        for n, runs in by_count.items():
            def med(proc: str, key: str) -> float:
                return statistics.median(run[proc][key] for run in runs)
            cells = [f"{med(p, 'sleeps_per_MB'):5.2f} {med(p, 'preemptions_per_MB'):5.2f} {med(p, 'cpu_s_per_GB'):.3f}"
                     for p in ("host", "guest", "server", "client")]
            mbps = statistics.median(run["MBps"] for run in runs)
            print(f"{label:9} {n:7d} {mbps:6.0f}  " + "  ".join(f"{c:>19}" for c in cells))
    print("each cell: sleeps/MB preemptions/MB CPU s/GB")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
