#!/usr/bin/env python3
"""How fast a port opened in the guest appears on the host, and what watching ports costs an idle guest
(python3 standard library and tests/integration/fixtures.py; needs root for the network namespace).

The guest agent runs in its own network and mount namespace (as the integration suite does), the host agent
outside it. First both agents sit idle, connected, for --idle-seconds, and their CPU use is read from
/proc/<pid>/schedstat (nanoseconds; /proc/<pid>/stat's 10 ms ticks where schedstat is missing). Then,
--count times: a helper inside the namespace starts listening on a fresh port and reports the
CLOCK_MONOTONIC time of its listen(); the harness connects to 127.0.0.1:<port> on the host every millisecond
until a connect succeeds. appear = that moment minus the listen time. The helper then closes the listener
and the harness polls until the host port is gone (remove). Opens and closes happen at random offsets, so
they do not lock onto the guest's scan period.

    sudo python3 bench/e2e/port_latency.py --build-dir build [--count 200] [--port-poll-ms 20] [--json out.json]

`vbridge bench` runs the same measurement (measure()) without the idle part.
"""

from __future__ import annotations

import os
import random
import shutil
import socket
import subprocess
import sys
import time

sys.dont_write_bytecode = True  # no __pycache__ in the source tree
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bridge import Pair, fixtures, percentiles, tool_arguments, write_json  # noqa: E402
from paths import free_tcp_port  # noqa: E402

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


def unavailable() -> str:
    """Why this benchmark cannot run here, or ""."""
    if os.geteuid() != 0:
        return "needs root (a network namespace for the guest agent)"
    for tool in ("unshare", "nsenter", "ip"):
        if shutil.which(tool, path=fixtures.SBIN_PATH) is None:
            return f"{tool} not found"
    return ""


def measure(workdir: fixtures.Workdir, build_dir: str, count: int, port_poll_ms: int = 20,
            idle_seconds: float = 0.0, step=None) -> dict:
    """Starts the agents (the guest in its own network namespace) and times `count` listeners appearing on
    and leaving the host. Runs inside the caller's fixtures scope. step(text), if given, is called per sample."""
    ns = fixtures.Netns(workdir, "portns")
    pair = Pair(workdir, build_dir, "ports", guest_args=["--port-poll-ms", str(port_poll_ms)],
                host_args=["--no-docker"], netns=ns).start()
    result: dict = {"port_poll_ms": port_poll_ms}
    if idle_seconds > 0:
        # Idle: connected, nothing listening in the guest, nothing to forward.
        time.sleep(0.5)
        g0, h0, t0 = cpu_seconds(pair.guest.pid), cpu_seconds(pair.host.pid), time.monotonic()
        time.sleep(idle_seconds)
        g1, h1, t1 = cpu_seconds(pair.guest.pid), cpu_seconds(pair.host.pid), time.monotonic()
        result["idle"] = {"seconds": round(t1 - t0, 2), "guest_cpu_percent": 100 * (g1 - g0) / (t1 - t0),
                          "host_cpu_percent": 100 * (h1 - h0) / (t1 - t0)}

    helper = subprocess.Popen(ns.wrap([sys.executable, "-c", HELPER]), stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, start_new_session=True)
    fixtures.defer(lambda: helper.poll() is None and (helper.kill(), helper.wait()))

    def ask(verb: str, port: int) -> int:
        helper.stdin.write(f"{verb} {port}\n".encode())
        helper.stdin.flush()
        line = helper.stdout.readline()
        if not line:
            raise RuntimeError("the helper in the guest namespace exited")
        return int(line)

    appear, remove = [], []
    used: set[int] = set()
    for i in range(count):
        if step:
            step(f"port appear {i + 1}/{count}")
        # A port free on the host now, so the host agent can bind the same number when the guest listens.
        port = free_tcp_port()
        while port in used:
            port = free_tcp_port()
        used.add(port)
        time.sleep(random.uniform(0, 2 * port_poll_ms / 1000))
        listened = ask("open", port)
        seen = wait(lambda: connects(port), 10, f"host port {port} to follow the guest's listener")
        appear.append((seen - listened) / 1e6)
        time.sleep(random.uniform(0, 2 * port_poll_ms / 1000))
        closed = ask("close", port)
        gone = wait(lambda: not connects(port), 10, f"host port {port} to go")
        remove.append((gone - closed) / 1e6)
    helper.stdin.close()
    helper.wait(5)
    result["appear_ms"] = percentiles(appear)
    result["remove_ms"] = percentiles(remove)
    result["appear_samples_ms"] = [round(v, 3) for v in appear]
    return result


def main() -> int:
    def add_arguments(parser) -> None:
        parser.add_argument("--count", type=int, default=200)
        parser.add_argument("--port-poll-ms", type=int, default=20, help="the guest agent's scan period")
        parser.add_argument("--idle-seconds", type=float, default=10.0)

    args = tool_arguments("port_latency", __doc__, add_arguments, unavailable)
    with fixtures.scope():
        result = measure(fixtures.Workdir("vbports"), args.build_dir, args.count, args.port_poll_ms,
                         args.idle_seconds)
    if "idle" in result:
        idle = result["idle"]
        print(f"idle over {idle['seconds']} s: guest agent {idle['guest_cpu_percent']:.2f}% of a core, "
              f"host agent {idle['host_cpu_percent']:.2f}%")
    for key, title in (("appear_ms", "appear"), ("remove_ms", "remove")):
        r = result[key]
        print(f"{title:6} (n={r['n']}): p50 {r['p50']:.1f} ms  p90 {r['p90']:.1f} ms  p99 {r['p99']:.1f} ms  "
              f"max {r['max']:.1f} ms  mean {r['mean']:.1f} ms")
    write_json(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
