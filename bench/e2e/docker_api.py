#!/usr/bin/env python3
"""Docker API latency through vbridge vs dockerd's own socket, side by side in one run.

Starts a private dockerd (as the integration suites do), the guest agent in front of it and the host agent,
then times GET /_ping and GET /containers/json on a fresh connection per request (as the docker CLI does)
and on one kept-alive connection, alternating between the two sockets so background load hits both alike.

  python3 bench/e2e/docker_api.py [--requests 2000] [--json FILE]

`vbridge bench` runs measure() on dockerd's socket, the bridged docker.sock, socat and ssh -L side by side.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import time

sys.dont_write_bytecode = True  # no __pycache__ in the source tree
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bridge import Pair, missing_agents  # noqa: E402
from fixtures import Dockerd, Workdir, dockerd_unavailable_reason, scope  # noqa: E402


def request(sock: socket.socket, path: str) -> None:
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: docker\r\n\r\n".encode())
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("closed")
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = None
    chunked = False
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
        if name.strip().lower() == b"transfer-encoding" and b"chunked" in value.lower():
            chunked = True
    if length is not None:
        while len(body) < length:
            body += sock.recv(65536)
    elif chunked:
        while not body.endswith(b"0\r\n\r\n"):
            body += sock.recv(65536)


def fresh(path: str, endpoint: str) -> float:
    t = time.perf_counter()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(10)
        s.connect(path)
        request(s, endpoint)
    return (time.perf_counter() - t) * 1e6


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


ENDPOINTS = ("/_ping", "/containers/json")
MODES = ("fresh", "keep-alive")


def measure(sockets: dict[str, str], requests: int, step=None) -> dict[str, dict[str, list[float]]]:
    """Times `requests` requests per endpoint, connection mode and socket, alternating between the sockets
    request by request so background load hits them all alike. Returns {socket name: {"<endpoint> <mode>":
    [microseconds, ...]}}. step(text), if given, is called every 50 requests."""
    results: dict[str, dict[str, list[float]]] = {name: {} for name in sockets}
    for endpoint in ENDPOINTS:
        for name in sockets:
            for mode in MODES:
                results[name][f"{endpoint} {mode}"] = []
        conns = {}
        try:
            for name, path in sockets.items():
                conns[name] = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                conns[name].settimeout(10)
                conns[name].connect(path)
            for i in range(requests):
                if step and i % 50 == 0:
                    step(f"docker {endpoint} {i}/{requests}")
                for name, path in sockets.items():
                    results[name][f"{endpoint} fresh"].append(fresh(path, endpoint))
                    t = time.perf_counter()
                    request(conns[name], endpoint)
                    results[name][f"{endpoint} keep-alive"].append((time.perf_counter() - t) * 1e6)
        finally:
            for s in conns.values():
                s.close()
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--build-dir", default=os.path.join(os.path.dirname(__file__), "..", "..", "build"))
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--json")
    args = ap.parse_args()
    reason = dockerd_unavailable_reason() or missing_agents(args.build_dir)
    if reason:
        sys.exit(f"docker_api: {reason}")
    with scope():
        wd = Workdir("vbbench")
        dockerd = Dockerd(wd, storage_driver="vfs").start()
        pair = Pair(wd, args.build_dir, "docker", guest_args=["--docker-socket", dockerd.socket_path, "--no-ports"],
                    host_args=["--no-follow-ports"]).start()
        sockets = {"direct": dockerd.socket_path, "vbridge": os.path.join(pair.runtime_dir, "docker.sock")}
        results = measure(sockets, args.requests,
                          lambda text: print(f"\r{text}", end="", file=sys.stderr, flush=True))
        print("\r", end="", file=sys.stderr)
        summary = {}
        print(f"Docker API latency, {args.requests} requests each (us)")
        print(f"{'request':32} {'direct p50':>11} {'p99':>8} {'vbridge p50':>12} {'p99':>8} {'p50 ratio':>10}")
        for key in results["direct"]:
            d, v = results["direct"][key], results["vbridge"][key]
            row = {"direct_p50": statistics.median(d), "direct_p99": pct(d, 0.99),
                   "vbridge_p50": statistics.median(v), "vbridge_p99": pct(v, 0.99)}
            summary[key] = row
            print(f"{key:32} {row['direct_p50']:11.0f} {row['direct_p99']:8.0f} {row['vbridge_p50']:12.0f} "
                  f"{row['vbridge_p99']:8.0f} {row['vbridge_p50'] / row['direct_p50']:9.2f}x")
        if args.json:
            with open(args.json, "w") as f:
                json.dump(summary, f, indent=2)


if __name__ == "__main__":
    main()
