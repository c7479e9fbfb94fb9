#!/usr/bin/env python3
"""Stops, kills, pauses and restarts a private pair of agents at random while clients keep them busy.

    tools/chaos.py [--build-dir build] [--seconds 300] [--seed 1] [--no-shm]

The pair: `vbridge-loadgen serve` on a unix socket, a guest agent beside it and a host agent forwarding a unix
socket to it, all in a temporary folder (shared memory as under `vbridge up`, unless --no-shm). Three client
threads run `vbridge-loadgen` without pause (throughput on 1 or 8 streams either way, round trips idle and
beside bulk, connections/s); their failures during a restart are expected and only counted. Every 0.05-1.5 s
one action, drawn with --seed: SIGTERM or SIGKILL to either agent, SIGTERM to both back to back (either
order), SIGSTOP of either agent for 0.1-3 s, or nothing. A stopped agent is started again at once.

Reported as problems, and the exit status is 1 if there are any:
* an agent that exits without being told to, or with a status other than 0 after SIGTERM;
* an agent still running 15 s after SIGTERM;
* a client run that hangs for 60 s;
* AddressSanitizer, LeakSanitizer or UBSan reports in any agent's log (build with -DVBRIDGE_SANITIZE=ON).
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Chaos:
    def __init__(self, build_dir: str, seed: int) -> None:
        self.build_dir = build_dir
        self.rng = random.Random(seed)
        self.seed = seed
        self.folder = tempfile.mkdtemp(prefix="vbridge-chaos-")
        self.problems: list[str] = []
        self.lock = threading.Lock()
        self.stopping = False
        self.client_runs = {"ok": 0, "failed": 0}
        self.actions: dict[str, int] = {}
        self.loadgen = os.path.join(build_dir, "bench", "e2e", "vbridge-loadgen")

    def path(self, name: str) -> str:
        return os.path.join(self.folder, name)

    def problem(self, text: str) -> None:
        with self.lock:
            self.problems.append(text)
        print(f"chaos: problem: {text}", flush=True)

    def client_loop(self, k: int) -> None:
        rng = random.Random(self.seed * 100 + k)
        to = "unix:" + self.path("client.sock")
        while not self.stopping:
            t = f"{rng.uniform(0.2, 1.5):.2f}"
            mode, argv = rng.choice([
                ("throughput", ["throughput", "--connect", to, "--seconds", t]),
                ("throughput x8", ["throughput", "--connect", to, "--seconds", t, "--streams", "8"]),
                ("throughput reverse", ["throughput", "--connect", to, "--seconds", t, "--reverse-only"]),
                ("rtt", ["rtt", "--connect", to, "--count", "2000", "--seconds", t]),
                ("rtt beside bulk", ["rtt", "--connect", to, "--count", "2000", "--seconds", t, "--background-bulk"]),
                ("connrate", ["connrate", "--connect", to, "--seconds", t, "--parallel", "4"]),
            ])
            try:
                rc = subprocess.run([self.loadgen, *argv], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                    timeout=60).returncode
                with self.lock:
                    self.client_runs["ok" if rc == 0 else "failed"] += 1
            except subprocess.TimeoutExpired:
                self.problem(f"a `vbridge-loadgen {mode}` client hung for 60 s")


class Agent:
    """One agent process, restarted under the same name; knows which signal it was sent."""

    def __init__(self, chaos: Chaos, name: str, argv: list[str]) -> None:
        self.chaos, self.name, self.argv = chaos, name, argv
        self.process: subprocess.Popen | None = None
        self.starts = 0
        self.sent: int | None = None

    def start(self) -> None:
        self.starts += 1
        log_path = self.chaos.path(f"{self.name}.{self.starts}.log")
        with open(log_path, "w") as log:
            self.process = subprocess.Popen(self.argv, stdout=log, stderr=subprocess.STDOUT)
        self.sent = None
        # Up once it logs its first listening socket (a stale socket file says nothing): a signal that comes
        # before the agent catches signals would only test the default action.
        deadline = time.monotonic() + 10
        while self.process.poll() is None and time.monotonic() < deadline:
            with open(log_path, errors="replace") as f:
                if "listening on" in f.read():
                    return
            time.sleep(0.01)

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def send(self, sig: int) -> None:
        if self.alive():
            assert self.process is not None
            if sig in (signal.SIGTERM, signal.SIGKILL):
                self.sent = sig
            self.process.send_signal(sig)

    def reap(self) -> None:
        """Records how a process that has exited ended."""
        if self.process is None or self.process.poll() is None:
            return
        rc = self.process.returncode
        if self.sent is None:
            self.chaos.problem(f"{self.name} agent (start {self.starts}) exited by itself with {rc}")
        elif self.sent == signal.SIGTERM and rc != 0:
            self.chaos.problem(f"{self.name} agent (start {self.starts}) exited with {rc} after SIGTERM")
        self.process = None

    def stop(self, sig: int = signal.SIGTERM) -> None:
        self.send(sig)
        if self.process is None:
            return
        try:
            self.process.wait(15)
        except subprocess.TimeoutExpired:
            self.chaos.problem(f"{self.name} agent (start {self.starts}) still running 15 s after signal {sig}")
            self.process.kill()
            self.process.wait()
            self.process = None
            return
        self.reap()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--build-dir", default=os.path.join(REPO, "build"))
    ap.add_argument("--seconds", type=float, default=300)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--no-shm", action="store_true", help="copy every byte through the transport")
    args = ap.parse_args()
    chaos = Chaos(args.build_dir, args.seed)
    p = chaos.path
    with open(p("token"), "w") as f:
        f.write(os.urandom(32).hex() + "\n")
    os.chmod(p("token"), 0o600)
    shm = [] if args.no_shm else ["--shm-file", p("shared.mem")]
    guest = Agent(chaos, "guest", [
        os.path.join(args.build_dir, "guest", "vbridge-guest"), "--listen", "unix:" + p("transport.sock"),
        "--log-level", "info", "--token-file", p("token"), "--allow-unix", p("server.sock"), *shm])
    host = Agent(chaos, "host", [
        os.path.join(args.build_dir, "host", "vbridge-host"), "--transport", "unix:" + p("transport.sock"),
        "--runtime-dir", p("rt"), "--no-docker", "--no-docker-context", "--no-follow-ports", "--log-level", "info",
        "--token-file", p("token"), *shm, "--forward-unix", f"{p('client.sock')}={p('server.sock')}"])
    for binary in (guest.argv[0], host.argv[0], chaos.loadgen):
        if not os.access(binary, os.X_OK):
            print(f"chaos: {binary} is not built; build the targets vbridge-host, vbridge-guest and "
                  f"vbridge-loadgen (cmake --build {args.build_dir})", file=sys.stderr)
            return 2
    server = subprocess.Popen([chaos.loadgen, "serve", "--unix", p("server.sock")], stdout=subprocess.DEVNULL)
    threads: list[threading.Thread] = []
    try:
        while not os.path.exists(p("server.sock")):
            time.sleep(0.01)
        guest.start()
        host.start()
        threads = [threading.Thread(target=chaos.client_loop, args=(k,), daemon=True) for k in range(3)]
        for t in threads:
            t.start()
        rng = chaos.rng
        end = time.monotonic() + args.seconds
        while time.monotonic() < end:
            time.sleep(rng.uniform(0.05, 1.5))
            guest.reap()
            host.reap()
            action = rng.choice(["SIGTERM guest", "SIGKILL guest", "SIGTERM host", "SIGKILL host",
                                 "SIGTERM host, guest", "SIGTERM guest, host", "SIGSTOP guest", "SIGSTOP host",
                                 "nothing", "nothing"])
            chaos.actions[action] = chaos.actions.get(action, 0) + 1
            sig, _, who = action.partition(" ")
            if action.startswith("SIGTERM") and "," in action:
                first, second = (host, guest) if who.startswith("host") else (guest, host)
                first.send(signal.SIGTERM)
                second.send(signal.SIGTERM)
                first.stop()
                second.stop()
            elif sig in ("SIGTERM", "SIGKILL"):
                (guest if who == "guest" else host).stop(getattr(signal, sig))
            elif sig == "SIGSTOP":
                agent = guest if who == "guest" else host
                agent.send(signal.SIGSTOP)
                time.sleep(rng.uniform(0.1, 3))
                agent.send(signal.SIGCONT)
            for agent in (guest, host):
                if not agent.alive():
                    agent.reap()
                    agent.start()
    finally:
        chaos.stopping = True
        for t in threads:
            t.join(90)
        host.stop()
        guest.stop()
        server.terminate()
        server.wait()
    for name in sorted(os.listdir(chaos.folder)):
        if name.endswith(".log"):
            with open(p(name), errors="replace") as f:
                text = f.read()
            if any(s in text for s in ("AddressSanitizer", "LeakSanitizer", "runtime error:")):
                chaos.problem(f"sanitizer report in {name}:\n{text[-4000:]}")
    print(f"chaos: {args.seconds:g} s, seed {args.seed}; actions {chaos.actions}; client runs {chaos.client_runs}; "
          f"agent starts: guest {guest.starts}, host {host.starts}; problems {len(chaos.problems)}")
    if chaos.problems:
        print(f"chaos: logs kept in {chaos.folder}")
        return 1
    shutil.rmtree(chaos.folder, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
