#!/usr/bin/env python3
"""End-to-end comparison of forwarding paths (python3 standard library only).

Starts vbridge-loadgen's server on a unix socket and a loopback TCP port in a temp dir, brings up every
path to it (direct, two chained socat relays, ssh -L through a private sshd, vbridge once it is built),
runs each benchmark on each path side by side, and prints a table with the ratio of each path to direct.

    python3 bench/e2e/run_e2e.py --loadgen build/bench/e2e/vbridge-loadgen [--quick] [--json out.json]

--quick runs one round of short tests in under a minute. The default runs three rounds, each over every
benchmark and path, in about three minutes and reports each figure's median (the JSON keeps every run).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path as FsPath

sys.dont_write_bytecode = True  # no __pycache__ in the source tree
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from paths import PATH_TYPES, Env, Path  # noqa: E402

REPO = FsPath(__file__).resolve().parents[2]


@dataclasses.dataclass(frozen=True)
class Profile:
    seconds: float        # each throughput direction and the connection-rate test
    rtt_count: int        # ping-pongs per rtt test ...
    rtt_seconds: float    # ... or fewer if this time runs out first
    parallel: int         # concurrent connectors in the connection-rate test
    repeat: int           # rounds over every benchmark and path; the table shows each figure's median


PROFILES = {
    "quick": Profile(seconds=1.0, rtt_count=2000, rtt_seconds=1.0, parallel=4, repeat=1),
    "default": Profile(seconds=1.5, rtt_count=10000, rtt_seconds=1.5, parallel=4, repeat=3),
}


@dataclasses.dataclass(frozen=True)
class Bench:
    key: str
    title: str
    argv: list[str]
    seconds: float   # expected duration, for the timeout


def benchmarks(p: Profile) -> list[Bench]:
    s, n, r = str(p.seconds), str(p.rtt_count), str(p.rtt_seconds)
    return [
        Bench("tput1", "throughput, 1 stream", ["throughput", "--streams", "1", "--seconds", s, "--reverse"],
              2 * p.seconds),
        Bench("tput8", "throughput, 8 streams", ["throughput", "--streams", "8", "--seconds", s], p.seconds),
        Bench("rtt", "rtt idle", ["rtt", "--count", n, "--seconds", r], p.rtt_seconds),
        Bench("rtt_bulk", "rtt under bulk", ["rtt", "--count", n, "--seconds", r, "--background-bulk"],
              p.rtt_seconds),
        Bench("connrate", "connections/s", ["connrate", "--seconds", s, "--parallel", str(p.parallel)], p.seconds),
    ]


@dataclasses.dataclass(frozen=True)
class Metric:
    key: str
    label: str
    bench: str
    field: tuple[str, ...]
    unit: str              # "MB/s", "us" or "1/s"

    def value(self, raw: dict) -> float | None:
        for f in self.field:
            if not isinstance(raw, dict) or f not in raw:
                return None
            raw = raw[f]
        return float(raw)


METRICS = [
    Metric("tput1", "1 stream  client->server", "tput1", ("forward", "MBps"), "MB/s"),
    Metric("tput1_rev", "1 stream  server->client", "tput1", ("reverse", "MBps"), "MB/s"),
    Metric("tput8", "8 streams client->server", "tput8", ("forward", "MBps"), "MB/s"),
    Metric("rtt_p50", "rtt p50, idle", "rtt", ("p50_us",), "us"),
    Metric("rtt_p99", "rtt p99, idle", "rtt", ("p99_us",), "us"),
    Metric("load_p50", "rtt p50, beside bulk", "rtt_bulk", ("p50_us",), "us"),
    Metric("load_p99", "rtt p99, beside bulk", "rtt_bulk", ("p99_us",), "us"),
    Metric("conn", "connections/s", "connrate", ("per_second",), "1/s"),
]


class Interrupted(Exception):
    pass


def _on_signal(signum, _frame):
    raise Interrupted(signal.Signals(signum).name)


# --------------------------------------------------------------------------------------------------------
# Progress and output


class Progress:
    """One line on stderr, rewritten in place on a terminal, one line per step otherwise."""

    def __init__(self, total: int):
        self.total = total
        self.done = 0
        self.t0 = time.monotonic()
        self.tty = sys.stderr.isatty()

    def step(self, text: str) -> None:
        self.done += 1
        self.show(f"[{self.done:2}/{self.total}] {text}")

    def show(self, text: str) -> None:
        line = f"{time.monotonic() - self.t0:5.1f}s {text}"
        if self.tty:
            sys.stderr.write("\r\x1b[K" + line[:150])
        else:
            sys.stderr.write(line + "\n")
        sys.stderr.flush()

    def finish(self) -> None:
        if self.tty:
            sys.stderr.write("\r\x1b[K")
            sys.stderr.flush()


def fmt(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.1f}" if value < 100 else f"{value:.0f}"


def table(family: str, paths: list[Path], report: dict) -> str:
    """Rows are metrics, columns are the paths of one socket family; each cell has the ratio to direct."""
    cols = [p for p in paths if p.family == family]
    direct = report[f"direct/{family}"]["metrics"]
    head = [f"{family} sockets"] + [p.name for p in cols]
    rows = []
    for m in METRICS:
        row = [f"{m.label} ({m.unit})"]
        for p in cols:
            entry = report[p.label]
            if entry["skip_reason"]:
                row.append("skipped")
                continue
            v = entry["metrics"].get(m.key)
            base = direct.get(m.key)
            cell = fmt(v)
            if v is not None and base and p.name != "direct":
                cell += f" {v / base:5.2f}x"
            row.append(cell)
        rows.append(row)
    widths = [max(len(r[i]) for r in [head] + rows) for i in range(len(head))]
    lines = ["  ".join(c.ljust(widths[0]) if i == 0 else c.rjust(widths[i]) for i, c in enumerate(r))
             for r in [head] + rows]
    lines.insert(1, "-" * len(lines[0]))
    notes = [f"  {p.name}: {report[p.label]['skip_reason']}" for p in cols if report[p.label]["skip_reason"]]
    return "\n".join(lines + notes)


def tool_version(argv: list[str], marker: str) -> str:
    """The first line of a tool's version output that contains marker."""
    try:
        r = subprocess.run(argv, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return next((ln.strip() for ln in (r.stdout + r.stderr).splitlines() if marker in ln), "")


def machine() -> dict:
    u = platform.uname()
    return {"kernel": u.release, "machine": u.machine, "cpus": os.cpu_count(),
            "socat": tool_version(["socat", "-V"], "socat version"), "ssh": tool_version(["ssh", "-V"], "OpenSSH")}


# --------------------------------------------------------------------------------------------------------
# Run


def run_bench(env: Env, path: Path, bench: Bench) -> dict:
    argv = [env.loadgen, *bench.argv, "--connect", path.client_addr]
    try:
        r = env.children.run(argv, timeout=bench.seconds + 60)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {bench.seconds + 60:.0f} s"}
    lines = r.stdout.strip().splitlines()
    try:
        raw = json.loads(lines[-1])
    except (IndexError, json.JSONDecodeError):
        raw = {}
    if r.returncode != 0 and "error" not in raw:
        raw["error"] = r.stderr.strip() or f"exit status {r.returncode}"
    return raw


def run(args, env: Env, profile: Profile) -> dict:
    families = args.families.split(",")
    wanted = set(args.paths.split(",")) if args.paths else None
    paths = [cls(env, fam) for fam in families for cls in PATH_TYPES
             if wanted is None or cls.name in wanted or cls.name == "direct"]
    benches = benchmarks(profile)
    # Per path: raw loadgen output of every run, median per metric, [min, max] per metric, median / direct.
    report: dict = {p.label: {"label": p.label, "name": p.name, "family": p.family, "skip_reason": "",
                              "client_addr": "", "results": {}, "metrics": {}, "spread": {}, "ratio_to_direct": {}}
                    for p in paths}

    progress = Progress(0)
    progress.show("starting the loadgen server")
    env.start_server()
    running = []
    for p in paths:
        progress.show(f"starting {p.label}")
        ok, reason = p.available()
        if ok:
            try:
                p.start()
                running.append(p)
                report[p.label]["client_addr"] = p.client_addr
            except (RuntimeError, OSError, NotImplementedError) as e:
                reason = f"failed to start: {e}"
                p.stop()
        report[p.label]["skip_reason"] = reason

    # Rounds interleave the paths, so a change in background load hits them all alike.
    rounds = profile.repeat
    progress.total = rounds * len(running) * len(benches)
    for r in range(rounds):
        for b in benches:
            for p in running:
                progress.step(f"round {r + 1}/{rounds}  {b.title:22} {p.label}")
                report[p.label]["results"].setdefault(b.key, []).append(run_bench(env, p, b))
    progress.finish()

    for p in paths:
        entry = report[p.label]
        for m in METRICS:
            runs = entry["results"].get(m.bench, [])
            values = [v for v in (m.value(raw) for raw in runs if "error" not in raw) if v is not None]
            if values:
                entry["metrics"][m.key] = round(statistics.median(values), 3)
                entry["spread"][m.key] = [round(min(values), 3), round(max(values), 3)]
    for p in paths:
        base = report[f"direct/{p.family}"]["metrics"]
        for k, v in report[p.label]["metrics"].items():
            if base.get(k):
                report[p.label]["ratio_to_direct"][k] = round(v / base[k], 4)
    for p in running:
        p.stop()
    return {"paths": paths, "report": report}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--loadgen", help="vbridge-loadgen binary (default: <build-dir>/bench/e2e/vbridge-loadgen)")
    ap.add_argument("--build-dir", default=str(REPO / "build"), help="where vbridge-host/-guest are looked for")
    ap.add_argument("--quick", action="store_true", help="short runs: the whole comparison in under a minute")
    ap.add_argument("--json", metavar="FILE", help="write every raw result and the summary to FILE")
    ap.add_argument("--paths", default="", help="comma-separated subset of: "
                    + ", ".join(c.name for c in PATH_TYPES) + " (direct always runs)")
    ap.add_argument("--families", default="unix,tcp", help="unix, tcp or both (default)")
    ap.add_argument("--repeat", type=int, help="rounds (default: 1 with --quick, 3 otherwise)")
    ap.add_argument("--keep-tmp", action="store_true", help="keep the temp dir (logs, sshd config)")
    args = ap.parse_args()

    loadgen = args.loadgen or str(FsPath(args.build_dir) / "bench" / "e2e" / "vbridge-loadgen")
    if not os.access(loadgen, os.X_OK):
        print(f"run_e2e: no loadgen binary at {loadgen}; build target vbridge-loadgen or pass --loadgen",
              file=sys.stderr)
        return 2
    if any(f not in ("unix", "tcp") for f in args.families.split(",")):
        print("run_e2e: --families takes unix, tcp or unix,tcp", file=sys.stderr)
        return 2

    mode = "quick" if args.quick else "default"
    profile = PROFILES[mode]
    if args.repeat:
        profile = dataclasses.replace(profile, repeat=max(1, args.repeat))
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _on_signal)

    started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    t0 = time.monotonic()
    env = Env(loadgen, args.build_dir, keep_tmp=args.keep_tmp)
    try:
        out = run(args, env, profile)
    except (KeyboardInterrupt, Interrupted):
        print("\nrun_e2e: interrupted; stopping every child process", file=sys.stderr)
        return 130
    finally:
        env.close()
        if args.keep_tmp:
            print(f"run_e2e: kept {env.tmp}", file=sys.stderr)

    paths, report = out["paths"], out["report"]
    info = machine()
    print(f"vbridge e2e bench ({mode}): {info['cpus']} cpus, Linux {info['kernel']}, "
          f"{info['ssh']}, {info['socat']}")
    print(f"median of {profile.repeat} round(s); ratio = path / direct: higher is better for MB/s and "
          "connections/s, lower for rtt (us)\n")
    for fam in args.families.split(","):
        print(table(fam, paths, report))
        print()
    errors = [(label, b, raw["error"]) for label, e in report.items() for b, runs in e["results"].items()
              for raw in runs if "error" in raw]
    for label, b, err in errors:
        print(f"error: {label} {b}: {err}")
    elapsed = time.monotonic() - t0
    print(f"took {elapsed:.0f} s")

    if args.json:
        doc = {"version": 1, "mode": mode, "started": started, "seconds": round(elapsed, 1), "machine": info,
               "profile": dataclasses.asdict(profile),
               "metrics": {m.key: {"label": m.label, "unit": m.unit} for m in METRICS},
               "paths": list(report.values())}
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(doc, f, indent=2)
            f.write("\n")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
