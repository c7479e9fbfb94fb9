#!/usr/bin/env python3
"""`vbridge bench`: the bridge against a direct connection, two socat relays and `ssh -L`, side by side in one
run on one machine (python3 standard library and tests/integration/fixtures.py).

Sections (--sections picks some; each is skipped with a note when what it needs is missing):

  streams  vbridge-loadgen's server on a unix socket (the Docker-socket path) and a loopback TCP port (a
           port forward), reached through each path: 1-stream throughput both ways, 8-stream aggregate,
           64-byte round trips idle and beside a bulk stream, connections/s
  docker   a private dockerd: GET /_ping and /containers/json on its own socket, the bridged docker.sock,
           socat and ssh -L, fresh connections and kept-alive
  idle     agent memory (VmRSS) with 1,000 idle streams open through vbridge
  ports    a guest listen() (guest agent in its own network namespace) until the host port accepts
  files    a host file write until inotifywait fires in the guest, on a bindfs mount of the folder

    python3 bench/e2e/run_e2e.py --build-dir build [--quick] [--json out.json] [--plot out.svg]

--quick runs one short round of everything in under a minute. The default runs three rounds of the stream
benchmarks (paths interleaved, so load changes hit all alike) and larger samples of the rest, in about four
minutes, and reports medians; the JSON keeps every run.
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
import docker_api  # noqa: E402
import file_latency  # noqa: E402
import idle_streams  # noqa: E402
import plot  # noqa: E402
import port_latency  # noqa: E402
from bridge import fixtures, missing_agents, percentiles  # noqa: E402
from paths import PATH_TYPES, Env, EnvView, Path  # noqa: E402

REPO = FsPath(__file__).resolve().parents[2]


@dataclasses.dataclass(frozen=True)
class Profile:
    seconds: float        # each throughput direction and the connection-rate test
    rtt_count: int        # ping-pongs per rtt test ...
    rtt_seconds: float    # ... or fewer if this time runs out first
    parallel: int         # concurrent connectors in the connection-rate test
    repeat: int           # rounds over every benchmark and path; the table shows each figure's median
    docker_requests: int  # per round, endpoint, connection kind and path
    port_samples: int     # guest listeners timed until the host port accepts
    file_samples: int     # host writes timed until the guest's inotifywait fires
    idle_streams: int     # streams held open through vbridge while the agents' memory is read


PROFILES = {
    "quick": Profile(seconds=0.75, rtt_count=1000, rtt_seconds=0.5, parallel=4, repeat=1, docker_requests=100,
                     port_samples=15, file_samples=20, idle_streams=1000),
    "default": Profile(seconds=1.5, rtt_count=10000, rtt_seconds=1.5, parallel=4, repeat=3, docker_requests=200,
                       port_samples=100, file_samples=100, idle_streams=1000),
}

SECTIONS = ("streams", "docker", "idle", "ports", "files")


@dataclasses.dataclass(frozen=True)
class Bench:
    key: str
    title: str
    argv: list[str]
    seconds: float   # expected duration, for the timeout


DIRECT_SERVER = "{direct server}"  # replaced by the loadgen server's own address of the path's family


def benchmarks(p: Profile) -> list[Bench]:
    s, n, r = str(p.seconds), str(p.rtt_count), str(p.rtt_seconds)
    return [
        Bench("tput1", "throughput, 1 stream", ["throughput", "--streams", "1", "--seconds", s, "--reverse"],
              2 * p.seconds),
        Bench("tput8", "throughput, 8 streams", ["throughput", "--streams", "8", "--seconds", s], p.seconds),
        Bench("rtt", "rtt idle", ["rtt", "--count", n, "--seconds", r], p.rtt_seconds),
        Bench("rtt_bulk", "rtt under bulk", ["rtt", "--count", n, "--seconds", r, "--background-bulk"],
              p.rtt_seconds),
        # The same round trip beside a bulk stream that goes straight to the server, not along the path:
        # what is left of "beside bulk" once the path's own queues are out of it (the CPU is still shared).
        Bench("rtt_cpu", "rtt beside bulk elsewhere",
              ["rtt", "--count", n, "--seconds", r, "--background-bulk", "--bulk-connect", DIRECT_SERVER],
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
    Metric("cpu_p50", "rtt p50, beside bulk elsewhere", "rtt_cpu", ("p50_us",), "us"),
    Metric("cpu_p99", "rtt p99, beside bulk elsewhere", "rtt_cpu", ("p99_us",), "us"),
    Metric("conn", "connections/s", "connrate", ("per_second",), "1/s"),
]


class Interrupted(Exception):
    pass


def _on_signal(signum, _frame):
    raise Interrupted(signal.Signals(signum).name)


# --------------------------------------------------------------------------------------------------------
# Progress and output


class Progress:
    """One line on stderr, rewritten in place on a terminal; plain lines otherwise (every step, and the
    details within a step at most once every few seconds)."""

    def __init__(self, total: int):
        self.total = total
        self.done = 0
        self.t0 = time.monotonic()
        self.tty = sys.stderr.isatty()
        self.current = ""
        self.last_plain = 0.0

    def step(self, text: str) -> None:
        self.done += 1
        self.current = f"[{self.done:2}/{self.total}] {text}"
        self.show(self.current)

    def detail(self, text: str) -> None:
        """Where a long step is (a sample count, say), after the step's own text."""
        if self.tty or time.monotonic() - self.last_plain >= 5:
            self.show(f"{self.current}  {text}")

    def show(self, text: str) -> None:
        line = f"{time.monotonic() - self.t0:5.1f}s {text}"
        if self.tty:
            sys.stderr.write("\r\x1b[K" + line[:150])
        else:
            sys.stderr.write(line + "\n")
            self.last_plain = time.monotonic()
        sys.stderr.flush()

    def finish(self) -> None:
        if self.tty:
            sys.stderr.write("\r\x1b[K")
            sys.stderr.flush()


def fmt(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.1f}" if value < 100 else f"{value:.0f}"


def stream_rows(doc: dict, family: str) -> tuple[list[str], list[list[tuple[str, float | None]]], list[str]]:
    """Rows are metrics, columns the paths of one socket family; a cell is (value text, ratio to direct)."""
    cols = [e for e in doc["paths"] if e["family"] == family]
    direct = next((e["metrics"] for e in cols if e["name"] == "direct"), {})
    head = [f"{family} sockets"] + [e["name"] for e in cols]
    rows = []
    for m in METRICS:
        row = [(f"{m.label} ({m.unit})", None)]
        for e in cols:
            if e["skip_reason"]:
                row.append(("skipped", None))
                continue
            v = e["metrics"].get(m.key)
            base = direct.get(m.key)
            row.append((fmt(v), v / base if v is not None and base and e["name"] != "direct" else None))
        rows.append(row)
    notes = [f"{e['name']}: {e['skip_reason']}" for e in cols if e["skip_reason"]]
    return head, rows, notes


def docker_rows(doc: dict) -> tuple[list[str], list[list[tuple[str, float | None]]], list[str]]:
    paths = doc["docker"]["paths"]
    names = [n for n in paths if not paths[n]["skip_reason"]]
    keys = list(paths["direct"]["requests"]) if "direct" in paths else []
    head = ["Docker API (us)"] + names
    rows = []
    for key in keys:
        for q in ("p50", "p99"):
            row = [(f"GET {key} {q}", None)]
            for n in names:
                r = paths[n]["requests"].get(key)
                row.append((fmt(r[f"{q}_us"]) if r else "-",
                            r.get(f"{q}_ratio_to_direct") if r and n != "direct" else None))
            rows.append(row)
    notes = [f"{n}: {e['skip_reason']}" for n, e in paths.items() if e["skip_reason"]]
    return head, rows, notes


def render_text(head: list[str], rows: list, notes: list[str]) -> str:
    cells = [head] + [[t + (f" {r:5.2f}x" if r is not None else "") for t, r in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(head))]
    lines = ["  ".join(c.ljust(widths[0]) if i == 0 else c.rjust(widths[i]) for i, c in enumerate(r)) for r in cells]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines + [f"  {n}" for n in notes])


def render_markdown(head: list[str], rows: list, notes: list[str]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        lines.append("| " + " | ".join(t + (f" ({r:.2f}×)" if r is not None else "") for t, r in row) + " |")
    return "\n".join(lines + [f"\n{n}" for n in notes])


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
    argv = [env.loadgen, *(env.server_addr(path.family) if a == DIRECT_SERVER else a for a in bench.argv),
            "--connect", path.client_addr]
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


def start_paths(paths: list[Path], report: dict, progress: Progress) -> list[Path]:
    """Brings up every available path; the others get their reason in report[label]["skip_reason"]."""
    running = []
    for p in paths:
        progress.detail(f"starting {p.label}")
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
    return running


def select_paths(args, env, families: list[str]) -> list[Path]:
    return [cls(env, fam) for fam in families for cls in PATH_TYPES if path_wanted(args, cls)]


def path_wanted(args, cls: type[Path]) -> bool:
    """direct always; without --paths every path but the opt-in yardsticks; with it, the paths it names."""
    if cls.name == "direct":
        return True
    return cls.name in args.paths.split(",") if args.paths else not cls.opt_in


def run_streams(args, env: Env, profile: Profile, progress: Progress) -> dict:
    paths = select_paths(args, env, args.families.split(","))
    benches = benchmarks(profile)
    # Per path: raw loadgen output of every run, median per metric, [min, max] per metric, median / direct.
    report: dict = {p.label: {"label": p.label, "name": p.name, "family": p.family, "skip_reason": "",
                              "client_addr": "", "results": {}, "metrics": {}, "spread": {}, "ratio_to_direct": {}}
                    for p in paths}
    progress.detail("starting the loadgen server")
    env.start_server()
    running = start_paths(paths, report, progress)

    # Rounds interleave the paths, so a change in background load hits them all alike.
    for r in range(profile.repeat):
        for b in benches:
            for p in running:
                progress.step(f"round {r + 1}/{profile.repeat}  {p.label:14} {b.title}")
                report[p.label]["results"].setdefault(b.key, []).append(run_bench(env, p, b))

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


def docker_ready(addr: str) -> bool:
    try:
        return fixtures.docker_ping(addr.removeprefix("unix:"), timeout=1.0)
    except Exception:  # noqa: BLE001 - any failure means "not yet"
        return False


def run_docker(args, env: Env, profile: Profile, progress: Progress) -> dict:
    """Docker API latency on dockerd's own socket and through each path to it, alternating request by request."""
    out: dict = {"requests_per_round": profile.docker_requests, "rounds": profile.repeat, "paths": {}}
    with fixtures.scope():
        progress.step("docker: starting dockerd and the paths to it")
        dockerd = fixtures.Dockerd(fixtures.Workdir("vbbd"), storage_driver="vfs").start()
        view = EnvView(env, "docker", dockerd.socket_path, ready=docker_ready, docker=True)
        paths = select_paths(args, view, ["unix"])
        report = {p.label: {"name": p.name, "skip_reason": "", "client_addr": ""} for p in paths}
        running = start_paths(paths, report, progress)
        try:
            samples: dict[str, dict[str, list[float]]] = {p.name: {} for p in running}
            per_round: dict[str, dict[str, list[float]]] = {p.name: {} for p in running}
            sockets = {p.name: p.client_addr.removeprefix("unix:") for p in running}
            for r in range(profile.repeat):
                progress.step(f"docker API round {r + 1}/{profile.repeat}: " + ", ".join(sockets))
                got = docker_api.measure(sockets, profile.docker_requests, progress.detail)
                for name, by_key in got.items():
                    for key, values in by_key.items():
                        samples[name].setdefault(key, []).extend(values)
                        per_round[name].setdefault(key, []).append(round(statistics.median(values), 1))
        finally:
            for p in running:
                p.stop()
    for p in paths:
        entry = {"skip_reason": report[p.label]["skip_reason"], "requests": {}}
        for key, values in samples.get(p.name, {}).items():
            pc = percentiles(values)
            entry["requests"][key] = {"p50_us": pc["p50"], "p99_us": pc["p99"], "n": pc["n"],
                                      "round_p50_us": per_round[p.name][key]}
        out["paths"][p.name] = entry
    direct = out["paths"].get("direct", {}).get("requests", {})
    for entry in out["paths"].values():
        for key, row in entry["requests"].items():
            if direct.get(key):
                row["p50_ratio_to_direct"] = round(row["p50_us"] / direct[key]["p50_us"], 3)
                row["p99_ratio_to_direct"] = round(row["p99_us"] / direct[key]["p99_us"], 3)
    return out


def run_idle(args, env: Env, profile: Profile, progress: Progress) -> dict:
    progress.step(f"memory with {profile.idle_streams} idle streams through vbridge")
    with fixtures.scope():
        return idle_streams.measure(fixtures.Workdir("vbidle"), args.build_dir, profile.idle_streams,
                                    progress.detail)


def run_ports(args, env: Env, profile: Profile, progress: Progress) -> dict:
    progress.step(f"port appear latency, {profile.port_samples} guest listeners")
    with fixtures.scope():
        return port_latency.measure(fixtures.Workdir("vbports"), args.build_dir, profile.port_samples,
                                    step=progress.detail)


def run_files(args, env: Env, profile: Profile, progress: Progress) -> dict:
    progress.step(f"file event latency, {profile.file_samples} host writes")
    with fixtures.scope():
        return file_latency.measure(fixtures.Workdir("vbfiles"), args.build_dir, profile.file_samples,
                                    progress.detail)


def skip_reason(section: str, args) -> str:
    """Why a section cannot run on this machine, or ""."""
    if section == "streams":
        return ""
    if section == "docker":
        return fixtures.dockerd_unavailable_reason() or ""
    agents = missing_agents(args.build_dir)
    if agents:
        return agents
    if section == "ports":
        return port_latency.unavailable()
    if section == "files":
        return file_latency.unavailable()
    return ""


RUNNERS = {"docker": run_docker, "idle": run_idle, "ports": run_ports, "files": run_files}
JSON_KEYS = {"docker": "docker", "idle": "idle_streams", "ports": "ports", "files": "file_events"}


def planned_steps(args, profile: Profile, sections: list[str], skips: dict[str, str]) -> int:
    n = 0
    if "streams" in sections:
        per_family = len([c for c in PATH_TYPES if path_wanted(args, c)])
        n += profile.repeat * len(benchmarks(profile)) * per_family * len(args.families.split(","))
    if "docker" in sections and not skips["docker"]:
        n += 1 + profile.repeat
    n += len([s for s in ("idle", "ports", "files") if s in sections and not skips[s]])
    return n


# --------------------------------------------------------------------------------------------------------
# Summary: tables, targets, plot


def p50_p99(summary: dict, digits: int) -> str:
    """ "p50 X ms, p99 Y ms" of a percentiles() summary in milliseconds."""
    return f"p50 {summary['p50']:.{digits}f} ms, p99 {summary['p99']:.{digits}f} ms"


def section_lines(doc: dict) -> list[str]:
    lines = []
    for fam in ("unix", "tcp"):
        idle, along, elsewhere = (metric_of(doc, f"vbridge/{fam}", k) for k in ("rtt_p99", "load_p99", "cpu_p99"))
        if idle and along and elsewhere:
            lines.append(f"vbridge rtt p99, {fam}: idle {fmt(idle)} us; beside bulk along the path {fmt(along)} us "
                         f"({along / idle:.2f}x idle); beside bulk that bypasses it {fmt(elsewhere)} us "
                         f"({elsewhere / idle:.2f}x idle: the share of the CPU alone)")
    idle = doc.get("idle_streams", {})
    if idle.get("with_streams"):
        b, w = idle["before"], idle["with_streams"]
        lines.append(f"memory, {idle['streams']} idle streams through vbridge ({idle['open_streams_reported']} "
                     f"reported open): host agent VmRSS {w['host']['rss_kib'] / 1024:.1f} MiB "
                     f"(idle {b['host']['rss_kib'] / 1024:.1f}), guest agent {w['guest']['rss_kib'] / 1024:.1f} MiB "
                     f"(idle {b['guest']['rss_kib'] / 1024:.1f})")
    ports = doc.get("ports", {})
    if ports.get("appear_ms"):
        a, r = ports["appear_ms"], ports["remove_ms"]
        lines.append(f"port appear (guest listen() -> host port accepts, n={a['n']}): {p50_p99(a, 1)}, "
                     f"max {a['max']:.1f} ms; gone after close: {p50_p99(r, 1)}")
    files = doc.get("file_events", {})
    if files.get("vbridge_ms"):
        v, d = files["vbridge_ms"], files["direct_ms"]
        lines.append(f"file event (host write -> guest inotifywait, n={v['n']}, missed {files['missed']}): "
                     f"{p50_p99(v, 2)}; host's own inotify (direct): p50 {d.get('p50', 0):.2f} ms")
    for key, title in (("docker", "docker"), ("idle_streams", "memory"), ("ports", "port appear"),
                       ("file_events", "file events")):
        sec = doc.get(key, {})
        if sec.get("skip_reason"):
            lines.append(f"{title}: skipped ({sec['skip_reason']})")
        if sec.get("error"):
            lines.append(f"{title}: error: {sec['error']}")
    return lines


def metric_of(doc: dict, label: str, key: str) -> float | None:
    for entry in doc["paths"]:
        if entry["label"] == label:
            return entry["metrics"].get(key)
    return None


def targets(doc: dict) -> list[dict]:
    """Each performance target with the figure this run measured and whether it is met (None: not measured)."""
    def ratio(a, b):
        return a / b if a is not None and b else None

    vb1 = metric_of(doc, "vbridge/unix", "tput1")
    idle = doc.get("idle_streams", {}).get("with_streams", {})
    items = [
        ("1-stream throughput client->server, unix, vs direct", ">=", 0.60,
         ratio(vb1, metric_of(doc, "direct/unix", "tput1")), "x"),
        ("1-stream throughput client->server, unix, vs socat2", ">=", 1.4,
         ratio(vb1, metric_of(doc, "socat2/unix", "tput1")), "x"),
        ("1-stream throughput client->server, unix, vs ssh -L", ">=", 5.0,
         ratio(vb1, metric_of(doc, "ssh-L/unix", "tput1")), "x"),
        ("8 streams vs 1 stream, unix", ">=", 1.0, ratio(metric_of(doc, "vbridge/unix", "tput8"), vb1), "x"),
        ("rtt p50 idle vs socat2, unix", "<", 1.0,
         ratio(metric_of(doc, "vbridge/unix", "rtt_p50"), metric_of(doc, "socat2/unix", "rtt_p50")), "x"),
        ("rtt p50 idle vs socat2, tcp", "<", 1.0,
         ratio(metric_of(doc, "vbridge/tcp", "rtt_p50"), metric_of(doc, "socat2/tcp", "rtt_p50")), "x"),
        ("rtt p99 beside bulk vs idle p99, unix", "<=", 2.0,
         ratio(metric_of(doc, "vbridge/unix", "load_p99"), metric_of(doc, "vbridge/unix", "rtt_p99")), "x"),
        ("rtt p99 beside bulk vs idle p99, tcp", "<=", 2.0,
         ratio(metric_of(doc, "vbridge/tcp", "load_p99"), metric_of(doc, "vbridge/tcp", "rtt_p99")), "x"),
        ("connections/s, unix", ">=", 8000, metric_of(doc, "vbridge/unix", "conn"), "/s"),
        ("port appear p99", "<=", 50, doc.get("ports", {}).get("appear_ms", {}).get("p99"), "ms"),
        ("file event p50", "<=", 20, doc.get("file_events", {}).get("vbridge_ms", {}).get("p50"), "ms"),
        ("host agent RSS with 1,000 idle streams", "<=", 32,
         idle["host"]["rss_kib"] / 1024 if idle else None, "MiB"),
        ("guest agent RSS with 1,000 idle streams", "<=", 32,
         idle["guest"]["rss_kib"] / 1024 if idle else None, "MiB"),
    ]
    if doc["mode"] == "quick":
        items.append(("vbridge bench --quick wall time", "<", 60, doc["seconds"], "s"))
    else:
        items.append(("vbridge bench (default) wall time", "<=", 300, doc["seconds"], "s"))
    out = []
    for name, op, limit, value, unit in items:
        met = None if value is None else (value >= limit if op == ">=" else value <= limit if op == "<="
                                          else value < limit)
        out.append({"target": name, "limit": f"{op} {limit:g} {unit}", "measured": None if value is None
                    else round(value, 3), "unit": unit, "met": met})
    return out


def target_lines(items: list[dict]) -> list[str]:
    lines = []
    for t in items:
        state = "not measured" if t["met"] is None else "met" if t["met"] else "NOT met"
        value = "-" if t["measured"] is None else f"{t['measured']:g} {t['unit']}"
        lines.append(f"  {t['target']:52} {t['limit']:>14}  measured {value:>14}  {state}")
    return lines


def relative(value: float | None, base: float | None, unit: str) -> float | None:
    """Performance as a fraction of direct: higher is better for every unit."""
    if not value or not base:
        return None
    return base / value if unit == "us" else value / base


def write_plot(doc: dict, path: str) -> None:
    by_label = {e["label"]: e for e in doc["paths"]}
    series = list(dict.fromkeys(e["name"] for e in doc["paths"] if e["name"] != "direct"))
    panels = []
    for fam, title in (("unix", "unix sockets (the Docker-socket path)"), ("tcp", "TCP port forward (127.0.0.1)")):
        direct = by_label.get(f"direct/{fam}")
        if not direct:
            continue
        rows = []
        for m in METRICS:
            row = {s: relative(by_label.get(f"{s}/{fam}", {}).get("metrics", {}).get(m.key),
                               direct["metrics"].get(m.key), m.unit) for s in series}
            rows.append((f"{m.label.replace('  ', ' ')} ({m.unit})", row))
        panels.append({"title": title, "rows": rows})
    dpaths = doc.get("docker", {}).get("paths", {})
    if dpaths.get("direct", {}).get("requests"):
        rows = []
        for key, d in dpaths["direct"]["requests"].items():
            for q in ("p50", "p99"):
                rows.append((f"GET {key} {q} (us)", {s: relative(dpaths.get(s, {}).get("requests", {}).get(key, {})
                                                               .get(f"{q}_us"), d[f"{q}_us"], "us") for s in series}))
        panels.append({"title": "Docker API, dockerd's socket vs bridged", "rows": rows})
    m = doc["machine"]
    subtitle = (f"{doc['mode']} mode, {doc['started']}, {m['cpus']} cpus, Linux {m['kernel']}, load average "
                f"{m.get('loadavg_start', '?')}; bar = performance / direct (latency: direct / path), log scale")
    svg = plot.render("vbridge bench: each path relative to a direct connection", subtitle, panels, series)
    with open(path, "w", encoding="utf-8") as f:
        f.write(svg)


# --------------------------------------------------------------------------------------------------------
# Main


def main() -> int:
    ap = argparse.ArgumentParser(prog="vbridge bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--build-dir", default=str(REPO / "build"), help="where vbridge-host/-guest/-loadgen are looked for")
    ap.add_argument("--loadgen", help="vbridge-loadgen binary (default: <build-dir>/bench/e2e/vbridge-loadgen)")
    ap.add_argument("--quick", action="store_true", help="short runs: everything in under a minute")
    ap.add_argument("--json", metavar="FILE", help="write every raw result and the summary to FILE")
    ap.add_argument("--plot", metavar="FILE.svg", help="write an SVG chart of each path relative to direct")
    ap.add_argument("--markdown", metavar="FILE", help="write the tables and targets as Markdown (for an issue)")
    ap.add_argument("--sections", default=",".join(SECTIONS), help="comma-separated subset of: "
                    + ", ".join(SECTIONS) + " (default: all)")
    ap.add_argument("--paths", default="", help="comma-separated subset of: "
                    + ", ".join(c.name for c in PATH_TYPES) + " (direct always runs; relay, relay2 and splice, "
                    "the plainest relays as yardsticks, run only when named)")
    ap.add_argument("--families", default="unix,tcp", help="stream benchmarks over unix, tcp or both (default)")
    ap.add_argument("--repeat", type=int, help="rounds (default: 1 with --quick, 3 otherwise)")
    ap.add_argument("--no-shm", action="store_true",
                    help="run the vbridge agents without shared memory (every byte copied through the transport)")
    ap.add_argument("--keep-tmp", action="store_true", help="keep the temp dir (logs, sshd config)")
    ap.add_argument("--from-json", metavar="FILE", help="run nothing: print the tables (and write --plot, --markdown) "
                    "from an earlier --json FILE")
    args = ap.parse_args()

    if args.from_json:
        with open(args.from_json, encoding="utf-8") as f:
            doc = json.load(f)
        args.json = None if os.path.abspath(args.json or "") == os.path.abspath(args.from_json) else args.json
        return report(doc, args)

    args.build_dir = str(FsPath(args.build_dir).resolve())
    loadgen = args.loadgen or str(FsPath(args.build_dir) / "bench" / "e2e" / "vbridge-loadgen")
    sections = [s for s in args.sections.split(",") if s]
    if any(s not in SECTIONS for s in sections):
        print(f"vbridge bench: --sections takes a comma-separated subset of {', '.join(SECTIONS)}", file=sys.stderr)
        return 2
    if "streams" in sections and not os.access(loadgen, os.X_OK):
        print(f"vbridge bench: no loadgen binary at {loadgen}; build target vbridge-loadgen "
              f"(cmake --build {args.build_dir}) or pass --build-dir/--loadgen", file=sys.stderr)
        return 2
    if any(f not in ("unix", "tcp") for f in args.families.split(",")):
        print("vbridge bench: --families takes unix, tcp or unix,tcp", file=sys.stderr)
        return 2
    if args.plot and not args.plot.endswith(".svg"):
        print(f"vbridge bench: --plot writes SVG; name the file *.svg (got {args.plot})", file=sys.stderr)
        return 2

    mode = "quick" if args.quick else "default"
    profile = PROFILES[mode]
    if args.repeat:
        profile = dataclasses.replace(profile, repeat=max(1, args.repeat))
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _on_signal)

    started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    info = machine()
    info["loadavg_start"] = " ".join(f"{v:.2f}" for v in os.getloadavg())
    info["vbridge_data_path"] = "copy" if args.no_shm else "shared memory"
    t0 = time.monotonic()
    skips = {s: skip_reason(s, args) for s in SECTIONS}
    progress = Progress(planned_steps(args, profile, sections, skips))
    env = Env(loadgen, args.build_dir, keep_tmp=args.keep_tmp)
    env.vbridge_shm = not args.no_shm
    doc: dict = {"version": 2, "mode": mode, "started": started, "build_dir": args.build_dir,
                 "profile": dataclasses.asdict(profile), "sections": sections,
                 "metrics": {m.key: {"label": m.label, "unit": m.unit} for m in METRICS}, "paths": []}
    streams = None
    try:
        if "streams" in sections:
            streams = run_streams(args, env, profile, progress)
            doc["paths"] = list(streams["report"].values())
        for section in ("docker", "idle", "ports", "files"):
            key = JSON_KEYS[section]
            if section not in sections:
                doc[key] = {"skip_reason": "not selected (--sections)"}
            elif skips[section]:
                doc[key] = {"skip_reason": skips[section]}
            else:
                try:
                    doc[key] = {"skip_reason": "", **RUNNERS[section](args, env, profile, progress)}
                except (RuntimeError, OSError, fixtures.FixtureError) as e:
                    doc[key] = {"skip_reason": "", "error": str(e).splitlines()[0] if str(e) else repr(e),
                                "detail": str(e)[-4000:]}
        progress.finish()
    except (KeyboardInterrupt, Interrupted):
        progress.finish()
        print("\nvbridge bench: interrupted; stopping every child process", file=sys.stderr)
        return 130
    except (RuntimeError, OSError) as e:
        progress.finish()
        print(f"vbridge bench: {e}", file=sys.stderr)
        return 1
    finally:
        env.close()
        if args.keep_tmp:
            print(f"vbridge bench: kept {env.tmp}", file=sys.stderr)

    elapsed = time.monotonic() - t0
    info["loadavg_end"] = " ".join(f"{v:.2f}" for v in os.getloadavg())
    doc["machine"] = info
    doc["seconds"] = round(elapsed, 1)
    doc["targets"] = targets(doc)

    return report(doc, args)


def report(doc: dict, args) -> int:
    """Prints the tables, the other sections and the targets; writes --json, --plot and --markdown.
    Returns 1 if any run failed."""
    info, mode = doc["machine"], doc["mode"]
    print(f"vbridge bench ({mode}, vbridge data path: {info.get('vbridge_data_path', 'copy')}): "
          f"{info['cpus']} cpus, Linux {info['kernel']}, {info['ssh']}, {info['socat']}; "
          f"load average {info['loadavg_start']} at the start, {info.get('loadavg_end', '?')} at the end")
    print(f"median of {doc['profile']['repeat']} round(s); ratio = path / direct: higher is better for MB/s and "
          "connections/s, lower for latencies (us)\n")
    families = sorted({e["family"] for e in doc["paths"]}, key=lambda f: f != "unix")
    tables = [stream_rows(doc, fam) for fam in families]
    if doc.get("docker", {}).get("paths"):
        tables.append(docker_rows(doc))
    for t in tables:
        print(render_text(*t))
        print()
    for line in section_lines(doc):
        print(line)
    print("\ntargets:")
    for line in target_lines(doc["targets"]):
        print(line)
    errors = [(e["label"], b, raw["error"]) for e in doc["paths"] for b, runs in e["results"].items()
              for raw in runs if "error" in raw]
    errors += [(key, "", doc[key]["error"]) for key in JSON_KEYS.values() if doc.get(key, {}).get("error")]
    for label, b, err in errors:
        print(f"error: {label} {b}: {err}")
    print(f"took {doc['seconds']:.0f} s")

    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(doc, f, indent=2)
            f.write("\n")
    if args.plot:
        write_plot(doc, args.plot)
    if args.markdown:
        with open(args.markdown, "w", encoding="utf-8") as f:
            f.write("\n\n".join(render_markdown(*t) for t in tables) + "\n\n")
            f.write("\n".join(f"- {line}" for line in section_lines(doc)) + "\n\n")
            f.write("| target | limit | measured | |\n|---|---|---|---|\n")
            for t in doc["targets"]:
                value = "-" if t["measured"] is None else f"{t['measured']:g} {t['unit']}"
                state = "not measured" if t["met"] is None else "met" if t["met"] else "**not met**"
                f.write(f"| {t['target']} | {t['limit']} | {value} | {state} |\n")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
