#!/usr/bin/env python3
"""CPU time per gigabyte spent by each relay of a path, side by side (python3 standard library only).

Throughput alone hides where the work goes; on a 2-core machine a relay that burns more CPU per byte also
slows whatever shares the machine with it. This starts vbridge-loadgen's server on a unix socket and, in
front of it, every path below, then runs one bulk stream through each path in turn and reads each relay
process's user+system CPU time (/proc/PID/stat, children included) before and after:

    vbridge          both agents, default data path (reads into pool buffers, gather writes)
    vbridge-splice   both agents with --splice (bulk bytes move socket → pipe → transport by splice(2))
    vbridge-shm      both agents with --shm-file on tmpfs (bytes read into shared memory, DATA_REF frames)
    socat2           two socat relays with 256 KiB buffers (one forked child per connection)

    python3 bench/e2e/relay_cpu.py --build-dir build [--direction forward|reverse] [--seconds 3]
                                   [--repeat 2] [--realtime]

--realtime runs everything under SCHED_FIFO (chrt -f 10), which keeps other work on the machine (a build, a
test run) from distorting the comparison of throughput; it distorts latency, so no latency is measured here.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
TOKEN = "relay-cpu-bench-token-0123456789\n"


def cpu_seconds(pid: int) -> float:
    """utime + stime + cutime + cstime of `pid` (socat's reaped per-connection children count)."""
    with open(f"/proc/{pid}/stat", encoding="ascii") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return sum(int(x) for x in fields[11:15]) / os.sysconf("SC_CLK_TCK")


def wait_for_socket(path: Path, proc: subprocess.Popen, what: str) -> None:
    deadline = time.monotonic() + 10
    while not path.exists():
        if proc.poll() is not None:
            sys.exit(f"relay_cpu: {what} exited with {proc.returncode} before creating {path}")
        if time.monotonic() > deadline:
            sys.exit(f"relay_cpu: {what} did not create {path} within 10 s")
        time.sleep(0.01)


class Bench:
    def __init__(self, build: Path, tmp: Path) -> None:
        self.build = build
        self.tmp = tmp
        self.procs: list[subprocess.Popen] = []
        self.loadgen = build / "bench" / "e2e" / "vbridge-loadgen"
        for binary in (self.loadgen, build / "guest" / "vbridge-guest", build / "host" / "vbridge-host"):
            if not binary.is_file():
                sys.exit(f"relay_cpu: {binary} is missing; build first (cmake --build {build})")
        self.token = tmp / "token"
        self.token.write_text(TOKEN)
        self.token.chmod(0o600)
        self.server_sock = tmp / "server.sock"
        self.server = self.spawn([str(self.loadgen), "serve", "--unix", str(self.server_sock)], "server")
        wait_for_socket(self.server_sock, self.server, "vbridge-loadgen serve")

    def spawn(self, argv: list[str], name: str) -> subprocess.Popen:
        log = open(self.tmp / f"{name}.log", "w")
        proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=log, start_new_session=True)
        self.procs.append(proc)
        return proc

    def vbridge(self, name: str, flags: list[str]) -> tuple[Path, list[subprocess.Popen]]:
        transport, client = self.tmp / f"{name}-transport.sock", self.tmp / f"{name}-client.sock"
        guest = self.spawn([str(self.build / "guest" / "vbridge-guest"), *flags, "--listen", f"unix:{transport}",
                            "--token-file", str(self.token), "--allow-unix", str(self.server_sock),
                            "--log-level", "warn"], f"{name}-guest")
        wait_for_socket(transport, guest, "vbridge-guest")
        host = self.spawn([str(self.build / "host" / "vbridge-host"), *flags, "--transport", f"unix:{transport}",
                           "--token-file", str(self.token), "--runtime-dir", str(self.tmp / f"{name}-rt"),
                           "--no-docker", "--no-docker-context", "--no-follow-ports", "--log-level", "warn",
                           "--forward-unix", f"{client}={self.server_sock}"], f"{name}-host")
        wait_for_socket(client, host, "vbridge-host")
        return client, [guest, host]

    def socat2(self) -> tuple[Path, list[subprocess.Popen]]:
        a, b = self.tmp / "socat-a.sock", self.tmp / "socat-b.sock"
        inner = self.spawn(["socat", "-b262144", f"UNIX-LISTEN:{b},fork", f"UNIX-CONNECT:{self.server_sock}"],
                           "socat-b")
        wait_for_socket(b, inner, "socat")
        outer = self.spawn(["socat", "-b262144", f"UNIX-LISTEN:{a},fork", f"UNIX-CONNECT:{b}"], "socat-a")
        wait_for_socket(a, outer, "socat")
        return a, [outer, inner]

    def measure(self, address: Path, relays: list[subprocess.Popen], direction: str, seconds: float) -> dict:
        watched = [*relays, self.server]
        before = [cpu_seconds(p.pid) for p in watched]
        argv = [str(self.loadgen), "throughput", "--connect", f"unix:{address}", "--seconds", str(seconds)]
        if direction == "reverse":
            argv.append("--reverse-only")
        out = subprocess.run(argv, capture_output=True, text=True, timeout=seconds * 4 + 30)
        time.sleep(0.3)  # socat reaps its per-connection children
        after = [cpu_seconds(p.pid) for p in watched]
        result = json.loads(out.stdout.strip().splitlines()[-1])[direction]
        gigabytes = result["bytes"] / 1e9
        used = [a - b for a, b in zip(after, before)]
        return {"MBps": result["MBps"], "relay_cpu_s_per_GB": [u / gigabytes for u in used[:-1]],
                "server_cpu_s_per_GB": used[-1] / gigabytes}

    def close(self) -> None:
        for proc in reversed(self.procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--build-dir", default=str(REPO / "build"))
    ap.add_argument("--direction", choices=("forward", "reverse"), default="forward",
                    help="forward: client → server (host → guest); reverse: server → client")
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--realtime", action="store_true", help="re-run itself under chrt -f 10 (SCHED_FIFO)")
    ap.add_argument("--json", metavar="FILE")
    args = ap.parse_args()
    if args.realtime and os.sched_getscheduler(0) != os.SCHED_FIFO:
        if not shutil.which("chrt"):
            sys.exit("relay_cpu: --realtime needs chrt (util-linux)")
        argv = [a for a in sys.argv if a != "--realtime"]
        os.execvp("chrt", ["chrt", "-f", "10", sys.executable, *argv])
    if not shutil.which("socat"):
        sys.exit("relay_cpu: socat is not installed (apt-get install socat)")
    with tempfile.TemporaryDirectory(prefix="vbridge-relay-cpu-") as tmp:
        bench = Bench(Path(args.build_dir).resolve(), Path(tmp))
        try:
            shm = f"/dev/shm/vbridge-relay-cpu-{os.getpid()}.shm"
            paths = {"vbridge": bench.vbridge("vbridge", []), "vbridge-splice": bench.vbridge("splice", ["--splice"]),
                     "vbridge-shm": bench.vbridge("shm", ["--shm-file", shm]), "socat2": bench.socat2()}
            rows: dict[str, list[dict]] = {name: [] for name in paths}
            for _ in range(args.repeat):
                for name, (address, relays) in paths.items():
                    rows[name].append(bench.measure(address, relays, args.direction, args.seconds))
        finally:
            bench.close()
            Path(shm).unlink(missing_ok=True)
    scheduling = "SCHED_FIFO" if os.sched_getscheduler(0) == os.SCHED_FIFO else "normal scheduling"
    print(f"{args.direction}, 1 stream, {args.seconds:g} s x {args.repeat}, {scheduling}; "
          "CPU seconds per GB moved (lower is better)")
    print(f"{'path':15} {'MB/s':>7} {'relay 1':>8} {'relay 2':>8} {'relays':>7} {'server':>7}")
    for name, runs in rows.items():
        for r in runs:
            cpu = r["relay_cpu_s_per_GB"]
            print(f"{name:15} {r['MBps']:7.0f} {cpu[0]:8.3f} {cpu[1]:8.3f} {sum(cpu):7.3f} "
                  f"{r['server_cpu_s_per_GB']:7.3f}")
    print("relay 1/2: vbridge-guest/vbridge-host, or the socat next to the client/next to the server")
    if args.json:
        Path(args.json).write_text(json.dumps({"direction": args.direction, "runs": rows}, indent=2))


if __name__ == "__main__":
    main()
