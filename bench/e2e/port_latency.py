#!/usr/bin/env python3
"""How fast a port opened in the guest appears on the host, and what watching ports costs an idle guest
(python3 standard library only; needs root for the network namespace).

The guest agent runs in its own network and mount namespace (as the integration suite does), the host agent
outside it. First both agents sit idle, connected, for --idle-seconds, and their CPU use is read from
/proc/<pid>/schedstat (nanoseconds; /proc/<pid>/stat's 10 ms ticks where schedstat is missing). Then,
--count times: a helper inside the namespace starts listening on a fresh port and reports the
CLOCK_MONOTONIC time of its listen(); the harness connects to 127.0.0.1:<port> on the host every millisecond
until a connect succeeds. appear = that moment minus the listen time. The helper then closes the listener
and the harness polls until the host port is gone (remove). Opens and closes happen at random offsets, so
they do not lock onto the guest's scan period.

    sudo python3 bench/e2e/port_latency.py --build-dir build [--count 200] [--port-poll-ms 20] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

HELPER = r"""
import socket, sys, time
held = {}
for line in sys.stdin:
    verb, port = line.split()
    port = int(port)
    if verb == "open":
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", port))
        s.listen(16)
        t = time.monotonic_ns()
        held[port] = s
    else:
        held.pop(port).close()
        t = time.monotonic_ns()
    print(t, flush=True)
"""


def find_binary(build_dir: str, name: str) -> str:
    for sub in ("", "guest", "host"):
        path = os.path.join(build_dir, sub, name)
        if os.path.isfile(path) and os.access(path, os.X_OK):
            return path
    sys.exit(f"{name} not found under {build_dir}; build first")


def cpu_seconds(pid: int) -> float:
    """CPU time used by pid so far: schedstat's nanoseconds when the kernel has them, else stat's ticks."""
    try:
        with open(f"/proc/{pid}/schedstat") as f:
            return int(f.read().split()[0]) / 1e9
    except (OSError, ValueError, IndexError):
        pass
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    # utime and stime are fields 14 and 15 of stat, 12 and 13 after "pid (comm) state".
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def connects(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.5)
        try:
            s.connect(("127.0.0.1", port))
            return True
        except OSError:
            return False


def wait(predicate, timeout: float, what: str, interval: float = 0.001) -> float:
    """Polls predicate every `interval` s; returns time.monotonic_ns() of the first true answer."""
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return time.monotonic_ns()
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)


def percentiles(values_ms: list[float]) -> dict:
    ordered = sorted(values_ms)

    def pct(p: float) -> float:
        return ordered[min(len(ordered) - 1, int(round(p / 100 * (len(ordered) - 1))))]

    return {"n": len(ordered), "min": ordered[0], "p50": pct(50), "p90": pct(90), "p99": pct(99),
            "max": ordered[-1], "mean": statistics.fmean(ordered)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--build-dir", default=os.path.join(os.path.dirname(__file__), "..", "..", "build"))
    parser.add_argument("--count", type=int, default=200)
    parser.add_argument("--port-poll-ms", type=int, default=20, help="the guest agent's scan period")
    parser.add_argument("--idle-seconds", type=float, default=10.0)
    parser.add_argument("--first-port", type=int, default=31000)
    parser.add_argument("--json", help="also write the figures here")
    parser.add_argument("--keep-tmp", action="store_true")
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("needs root (unshare --net --mount)")

    guest_bin = find_binary(args.build_dir, "vbridge-guest")
    host_bin = find_binary(args.build_dir, "vbridge-host")
    tmp = tempfile.mkdtemp(prefix="vbridge-ports-")
    procs: list[subprocess.Popen] = []

    def spawn(argv: list[str], log: str, **kw) -> subprocess.Popen:
        with open(os.path.join(tmp, log), "wb") as out:
            p = subprocess.Popen(argv, stdout=kw.pop("stdout", out), stderr=out, start_new_session=True, **kw)
        procs.append(p)
        return p

    try:
        holder = spawn(["unshare", "--net", "--mount", "--propagation", "private", "--", "sh", "-c",
                        "ip link set lo up && echo ready && exec sleep infinity"], "netns.log", stdout=subprocess.PIPE)
        if holder.stdout.readline().strip() != b"ready":
            raise RuntimeError("could not create the network namespace")
        enter = ["nsenter", f"--target={holder.pid}", "--net", "--mount", "--"]
        transport = os.path.join(tmp, "guest.sock")
        guest = spawn(enter + [guest_bin, "--listen", f"unix:{transport}", "--log-level", "warn",
                               "--port-poll-ms", str(args.port_poll_ms)], "guest.log")
        wait(lambda: os.path.exists(transport), 10, "the guest agent", 0.01)
        runtime = os.path.join(tmp, "rt")
        host = spawn([host_bin, "--transport", f"unix:{transport}", "--runtime-dir", runtime, "--no-docker",
                      "--log-level", "warn"], "host.log")
        status_sock = os.path.join(runtime, "status.sock")

        def connected() -> bool:
            try:
                with socket.socket(socket.AF_UNIX) as s:
                    s.connect(status_sock)
                    return json.loads(s.makefile().read()).get("connected") is True
            except OSError:
                return False

        wait(connected, 10, "the host agent to connect", 0.01)

        # Idle: connected, nothing listening in the guest, nothing to forward.
        time.sleep(0.5)
        g0, h0, t0 = cpu_seconds(guest.pid), cpu_seconds(host.pid), time.monotonic()
        time.sleep(args.idle_seconds)
        g1, h1, t1 = cpu_seconds(guest.pid), cpu_seconds(host.pid), time.monotonic()
        idle = {"seconds": round(t1 - t0, 2), "guest_cpu_percent": 100 * (g1 - g0) / (t1 - t0),
                "host_cpu_percent": 100 * (h1 - h0) / (t1 - t0)}

        helper = spawn(enter + [sys.executable, "-c", HELPER], "helper.log", stdin=subprocess.PIPE,
                       stdout=subprocess.PIPE)

        def ask(verb: str, port: int) -> int:
            helper.stdin.write(f"{verb} {port}\n".encode())
            helper.stdin.flush()
            line = helper.stdout.readline()
            if not line:
                raise RuntimeError("the helper in the guest namespace exited")
            return int(line)

        appear, remove = [], []
        for i in range(args.count):
            port = args.first_port + i
            time.sleep(random.uniform(0, 2 * args.port_poll_ms / 1000))
            listened = ask("open", port)
            seen = wait(lambda: connects(port), 10, f"host port {port}")
            appear.append((seen - listened) / 1e6)
            time.sleep(random.uniform(0, 2 * args.port_poll_ms / 1000))
            closed = ask("close", port)
            gone = wait(lambda: not connects(port), 10, f"host port {port} to go")
            remove.append((gone - closed) / 1e6)
        helper.stdin.close()

        result = {"port_poll_ms": args.port_poll_ms, "idle": idle, "appear_ms": percentiles(appear),
                  "remove_ms": percentiles(remove)}
        print(f"idle over {idle['seconds']} s: guest agent {idle['guest_cpu_percent']:.2f}% of a core, "
              f"host agent {idle['host_cpu_percent']:.2f}%")
        for key, title in (("appear_ms", "appear"), ("remove_ms", "remove")):
            r = result[key]
            print(f"{title:6} (n={r['n']}): p50 {r['p50']:.1f} ms  p90 {r['p90']:.1f} ms  p99 {r['p99']:.1f} ms  "
                  f"max {r['max']:.1f} ms  mean {r['mean']:.1f} ms")
        if args.json:
            with open(args.json, "w") as f:
                json.dump(result, f, indent=2)
        return 0
    finally:
        for p in reversed(procs):
            if p.poll() is None:
                os.kill(p.pid, signal.SIGTERM)
                try:
                    p.wait(5)
                except subprocess.TimeoutExpired:
                    os.kill(p.pid, signal.SIGKILL)
                    p.wait()
        if args.keep_tmp:
            print(f"logs in {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
