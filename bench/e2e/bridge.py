"""A vbridge agent pair for the benchmarks that need more than a forward: port following, file events,
memory with many streams (python3 standard library and tests/integration/fixtures.py).

The guest agent listens on a unix socket in a fixtures.Workdir (optionally inside a fixtures.Netns), the host
agent dials it; both are fixtures.Process objects, stopped with the current fixtures scope.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
from typing import Sequence

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "..", "tests", "integration"))

sys.dont_write_bytecode = True  # no __pycache__ in the source tree
import fixtures  # noqa: E402
from paths import find_agent, token_flags  # noqa: E402


def missing_agents(build_dir: str) -> str:
    """Why the agents cannot run from build_dir, or ""."""
    for name in ("vbridge-host", "vbridge-guest"):
        if find_agent(build_dir, name) is None:
            return f"{name} is not built in {build_dir}"
    return ""


def tool_arguments(tool: str, doc: str, add_arguments, unavailable=None) -> argparse.Namespace:
    """The command line of a standalone benchmark tool: --build-dir, the tool's own options (add_arguments
    adds them to the parser), --json. Exits naming the tool when the agents are not built or `unavailable()`
    gives a reason."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("--build-dir", default=os.path.join(HERE, "..", "..", "build"))
    add_arguments(parser)
    parser.add_argument("--json", help="also write the figures here")
    args = parser.parse_args()
    reason = (unavailable() if unavailable else "") or missing_agents(args.build_dir)
    if reason:
        sys.exit(f"{tool}: {reason}")
    return args


def write_json(path: str | None, result: dict) -> None:
    """Writes a tool's figures to `path` (its --json), if given."""
    if path:
        with open(path, "w") as f:
            json.dump(result, f, indent=2)


def memory_kib(pid: int) -> dict:
    """VmRSS and VmHWM of a process, in KiB, from /proc/PID/status."""
    out = {}
    with open(f"/proc/{pid}/status", encoding="ascii", errors="replace") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out["rss_kib" if key == "VmRSS" else "hwm_kib"] = int(value.split()[0])
    return out


class Pair:
    """vbridge-guest (in `netns` if given) and vbridge-host connected over a unix socket transport."""

    def __init__(self, workdir: fixtures.Workdir, build_dir: str, name: str, guest_args: Sequence[str] = (),
                 host_args: Sequence[str] = (), netns: fixtures.Netns | None = None) -> None:
        self.workdir = workdir
        self.guest_bin = find_agent(build_dir, "vbridge-guest")
        self.host_bin = find_agent(build_dir, "vbridge-host")
        if not self.guest_bin or not self.host_bin:
            raise fixtures.FixtureError(missing_agents(build_dir))
        self.name = name
        self.transport = workdir.join(f"{name}-guest.sock")
        self.runtime_dir = workdir.mkdir(f"{name}-rt")
        self.status_socket = os.path.join(self.runtime_dir, "status.sock")
        self.guest_args = list(guest_args)
        self.host_args = list(host_args)
        self.netns = netns
        self.guest: fixtures.Process | None = None
        self.host: fixtures.Process | None = None

    def start(self) -> "Pair":
        token = token_flags(self.guest_bin, self.workdir.mkdir(f"{self.name}-token"))
        guest = [self.guest_bin, "--listen", f"unix:{self.transport}", "--log-level", "warn", *token,
                 *self.guest_args]
        if self.netns is not None:
            guest = self.netns.wrap(guest)  # nsenter execs: the Process's PID is the agent's
        self.guest = fixtures.Process(self.workdir, f"{self.name}-guest", guest)
        fixtures.wait_for_unix_socket(self.transport, timeout=10, process=self.guest)
        host = [self.host_bin, "--transport", f"unix:{self.transport}", "--runtime-dir", self.runtime_dir,
                "--no-docker-context", "--log-level", "warn", *token, *self.host_args]
        self.host = fixtures.Process(self.workdir, f"{self.name}-host", host)

        def connected() -> bool:
            self.host.check_alive("before connecting")
            self.guest.check_alive("before the host connected")
            return self.status().get("connected") is True

        fixtures.wait_for(connected, 10, f"{self.name}: the host agent to connect to the guest agent")
        return self

    def status(self) -> dict:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(5)
            s.connect(self.status_socket)
            data = b""
            while chunk := s.recv(65536):
                data += chunk
        return json.loads(data)

    def memory(self) -> dict:
        assert self.guest is not None and self.host is not None
        return {"host": memory_kib(self.host.pid), "guest": memory_kib(self.guest.pid)}


def percentiles(values: list[float]) -> dict:
    """n, min, p50, p90, p99, max and mean of values (nearest rank)."""
    if not values:
        return {"n": 0}
    ordered = sorted(values)

    def pct(p: float) -> float:
        return ordered[min(len(ordered) - 1, int(round(p / 100 * (len(ordered) - 1))))]

    return {"n": len(ordered), "min": round(ordered[0], 3), "p50": round(pct(50), 3), "p90": round(pct(90), 3),
            "p99": round(pct(99), 3), "max": round(ordered[-1], 3),
            "mean": round(sum(ordered) / len(ordered), 3)}
