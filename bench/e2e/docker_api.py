#!/usr/bin/env python3
"""Docker API latency through vbridge vs dockerd's own socket, side by side in one run.

Starts a private dockerd (as the integration suites do), the guest agent in front of it and the host agent,
then times GET /_ping and GET /containers/json on a fresh connection per request (as the docker CLI does)
and on one kept-alive connection, alternating between the two sockets so background load hits both alike.

  python3 bench/e2e/docker_api.py [--requests 2000] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "..", "tests", "integration"))

from agents import GuestAgent, HostAgent  # noqa: E402
from fixtures import Dockerd, Workdir, scope  # noqa: E402


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
        s.connect(path)
        request(s, endpoint)
    return (time.perf_counter() - t) * 1e6


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--json")
    args = ap.parse_args()
    with scope():
        wd = Workdir("vbbench")
        dockerd = Dockerd(wd, storage_driver="overlay2").start()
        guest = GuestAgent(wd, docker_socket=dockerd.socket_path, log_level="warn").start()
        host = HostAgent(wd, "unix:" + guest.listen_path, log_level="warn").start()
        sockets = {"direct": dockerd.socket_path, "vbridge": host.docker_socket}
        results: dict[str, dict[str, list[float]]] = {name: {} for name in sockets}
        for endpoint in ("/_ping", "/containers/json"):
            for name in sockets:
                results[name][f"{endpoint} fresh"] = []
                results[name][f"{endpoint} keep-alive"] = []
            conns = {name: socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) for name in sockets}
            for name, s in conns.items():
                s.connect(sockets[name])
            for i in range(args.requests):
                for name, path in sockets.items():
                    results[name][f"{endpoint} fresh"].append(fresh(path, endpoint))
                    t = time.perf_counter()
                    request(conns[name], endpoint)
                    results[name][f"{endpoint} keep-alive"].append((time.perf_counter() - t) * 1e6)
                if i % 200 == 0:
                    print(f"\r{endpoint} {i}/{args.requests}", end="", file=sys.stderr, flush=True)
            for s in conns.values():
                s.close()
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
