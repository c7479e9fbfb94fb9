"""Starts vbridge's own agents as real processes for the integration suites."""

from __future__ import annotations

import os
import secrets
import socket
import struct
from typing import Sequence

from fixtures import FixtureError, Process, Workdir, find_binary, wait_for, wait_for_unix_socket


def binary(name: str) -> str:
    path = find_binary(name)
    if path is None:
        raise FixtureError(f"{name} is not built; run the build first (VBRIDGE_BUILD_DIR)")
    return path


def token_file(workdir: Workdir) -> str:
    """The workdir's shared transport token (--token-file of both agents): 32 random bytes as hex, mode 0600."""
    path = workdir.join("vbridge.token")
    if not os.path.exists(path):
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32) + "\n")
    return path


class GuestAgent:
    """vbridge-guest listening on a unix socket (the stand-in for vsock / virtio-serial).

    `token`: True (default) for the workdir's shared token file, a path for another one, None for
    --insecure-no-token."""

    def __init__(self, workdir: Workdir, docker_socket: str | None = None, extra: Sequence[str] = (),
                 name: str = "guest", listen: str | None = None, netns=None, log_level: str = "debug",
                 token: bool | str | None = True) -> None:
        self.log_level = log_level
        self.token_file = token_file(workdir) if token is True else (token or None)
        self.workdir = workdir
        self.listen_path = listen or workdir.join(f"{name}.sock")
        self.docker_socket = docker_socket
        self.extra = list(extra)
        self.name = name
        self.netns = netns
        self.process: Process | None = None

    def start(self) -> "GuestAgent":
        argv = [binary("vbridge-guest"), "--listen", "unix:" + self.listen_path, "--log-level", self.log_level,
                *(["--token-file", self.token_file] if self.token_file else ["--insecure-no-token"]), *self.extra]
        if self.docker_socket:
            argv += ["--docker-socket", self.docker_socket]
        if self.netns is not None:
            argv = self.netns.wrap(argv)
        self.process = Process(self.workdir, self.name, argv)
        wait_for_unix_socket(self.listen_path, timeout=10, process=self.process)
        return self

    def kill9(self) -> None:
        assert self.process is not None
        self.process.send_signal(9)
        self.process.wait_exit(5)


class HostAgent:
    """vbridge-host dialling a guest agent, serving docker.sock and a status socket in its runtime dir."""

    def __init__(self, workdir: Workdir, transport: str, extra: Sequence[str] = (), name: str = "host",
                 log_level: str = "debug", token: bool | str | None = True) -> None:
        self.log_level = log_level
        # The workdir's token on unix and TCP transports (not with --serial-chardev), unless told otherwise.
        needs_token = transport.startswith(("unix:", "tcp:")) and "--serial-chardev" not in extra
        self.token_file = (token_file(workdir) if token is True else (token or None)) if needs_token else None
        self.runtime_dir = workdir.mkdir(f"{name}-rt")
        self.docker_socket = os.path.join(self.runtime_dir, "docker.sock")
        self.status_socket = os.path.join(self.runtime_dir, "status.sock")
        self.workdir = workdir
        self.transport = transport
        self.extra = list(extra)
        self.name = name
        self.process: Process | None = None

    def start(self, wait_connected: bool = True) -> "HostAgent":
        argv = [binary("vbridge-host"), "--transport", self.transport, "--runtime-dir", self.runtime_dir,
                "--no-docker-context", "--log-level", self.log_level,
                *(["--token-file", self.token_file] if self.token_file else []), *self.extra]
        self.process = Process(self.workdir, self.name, argv)
        wait_for_unix_socket(self.status_socket, timeout=10, process=self.process)
        if wait_connected:
            wait_for(lambda: self.status().get("connected") is True, 10, "host agent to connect to the guest agent")
        return self

    def status(self) -> dict:
        import json

        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(5)
            s.connect(self.status_socket)
            data = b""
            while chunk := s.recv(65536):
                data += chunk
        return json.loads(data)


def hello_frame(version: int) -> bytes:
    """A HELLO frame as a peer of protocol `version` would send it."""
    payload = struct.pack("<IHHQIII4x", 0x47524256, version, 0, 0, 256 * 1024, 1 << 20, 100)
    return struct.pack("<IIBBH", len(payload), 0, 0, 0, 0) + payload
