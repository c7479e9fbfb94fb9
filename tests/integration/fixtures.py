"""Reusable fixtures for vbridge's integration suites (Python 3 standard library only).

Suites are plain `unittest` modules run from this folder with `python3 -m unittest -v <module>`.

Building blocks:

* `FixtureTestCase` -- a `unittest.TestCase` that gives every test its own `Workdir` (`self.workdir`)
  and terminates every `Process` (and `Dockerd`, `Netns`) that the test started. Whatever `setUpClass`
  starts lives until `tearDownClass` (use `cls.class_workdir`).
* `Workdir` -- a short temporary folder under /tmp (unix socket paths are limited to 107 bytes).
* `Process` -- a real child process, stdout/stderr in log files of its workdir, stopped by PID.
* `wait_for`, `wait_for_unix_socket`, `wait_for_tcp` -- polling with a deadline and a clear error.
* `Dockerd` -- Debian's dockerd with its own containerd, socket, data and exec roots.
* `docker` -- runs the docker CLI against a given socket; `make_busybox_image` imports a busybox image.
* `Netns` -- a network + mount namespace (loopback up) that processes can be started in.

Environment variables:

* VBRIDGE_BUILD_DIR     -- the CMake build folder (set by ctest); see `find_binary`.
* VBRIDGE_DOCKER_CLI    -- the docker client to use (default: /usr/bin/docker, else `docker` on PATH).
* VBRIDGE_KEEP_WORKDIR  -- set to 1 to keep workdirs (with all logs) after the tests, for debugging.
* VBRIDGE_DOCKER_STORAGE_DRIVER -- dockerd's storage driver (default vfs; overlay2 starts containers faster).
* VBRIDGE_STRICT        -- set to 1 (or CI set) to turn "dockerd unavailable" skips into failures.

Notes on Debian 12's docker.io (dockerd 20.10) with `--bridge=none`:

* `docker run IMAGE ...` works without `--network` (the container gets only a loopback interface);
  `--network none` and `--network host` work as well.
* The legacy builder (`DOCKER_BUILDKIT=0`) builds without extra flags. BuildKit fails with
  "network bridge not found" unless the build is given `--network host` or `--network none`.
  A docker client without the buildx plugin (such as a newer /usr/local/bin/docker) uses the legacy builder.
* dockerd writes /etc/docker/key.json once per machine; nothing else it writes is shared between instances.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import functools
import http.client
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
import unittest
from typing import Any, Callable, Iterable, Sequence

POLL_INTERVAL = 0.01  # seconds between two checks of a wait_for predicate
TMP_BASE = "/tmp"  # not $TMPDIR: socket paths must stay short
SBIN_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


class FixtureError(Exception):
    """A fixture could not do what it was asked; the message says what and includes logs."""


class WaitTimeout(FixtureError, TimeoutError):
    """A wait_for deadline passed."""


def strict_mode() -> bool:
    return os.environ.get("VBRIDGE_STRICT", "") not in ("", "0") or os.environ.get("CI", "") not in ("", "0", "false")


# ---------------------------------------------------------------------------------------------------------
# Cleanup scopes: everything a fixture starts registers its cleanup in the innermost scope. FixtureTestCase
# opens one scope per class and one per test; anything started outside a scope is cleaned up at exit.


class _Scopes:
    def __init__(self) -> None:
        self._stack: list[contextlib.ExitStack] = [contextlib.ExitStack()]

    def push(self) -> None:
        self._stack.append(contextlib.ExitStack())

    def pop(self) -> None:
        if len(self._stack) > 1:
            self._stack.pop().close()

    def defer(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        self._stack[-1].callback(fn, *args, **kwargs)

    def close_all(self) -> None:
        while len(self._stack) > 1:
            with contextlib.suppress(Exception):
                self.pop()
        with contextlib.suppress(Exception):
            self._stack[0].close()
        self._stack = [contextlib.ExitStack()]


_scopes = _Scopes()
atexit.register(_scopes.close_all)


def defer(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
    """Runs fn(*args, **kwargs) when the current scope (test, class or process) ends. Last in, first out."""
    _scopes.defer(fn, *args, **kwargs)


@contextlib.contextmanager
def scope():
    """A cleanup scope outside FixtureTestCase: processes started inside are stopped on leaving it."""
    _scopes.push()
    try:
        yield
    finally:
        _scopes.pop()


# ---------------------------------------------------------------------------------------------------------
# Waiting


def wait_for(
    predicate: Callable[[], Any],
    timeout: float,
    what: str,
    interval: float = POLL_INTERVAL,
    ignore: tuple[type[BaseException], ...] = (OSError,),
) -> Any:
    """Polls predicate() until it returns something truthy, and returns that.

    Exceptions of the types in `ignore` count as "not yet" (the last one is quoted on timeout); any other
    exception propagates at once, so a predicate can abort the wait (e.g. when the awaited process died).
    Raises WaitTimeout naming `what` when `timeout` seconds pass.
    """
    deadline = time.monotonic() + timeout
    last_error: BaseException | None = None
    while True:
        try:
            result = predicate()
            if result:
                return result
        except ignore as e:  # noqa: PERF203 - polling
            last_error = e
        now = time.monotonic()
        if now >= deadline:
            message = f"timed out after {timeout:g} s waiting for {what}"
            if last_error is not None:
                message += f" (last error: {last_error!r})"
            raise WaitTimeout(message)
        time.sleep(min(interval, deadline - now))


def unix_socket_accepts(path: str) -> bool:
    """True if a stream connection to the unix socket at path succeeds (it is closed at once)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(1.0)
        s.connect(path)
    return True


def wait_for_unix_socket(path: str, timeout: float = 10.0, process: "Process | None" = None) -> None:
    """Waits until a connection to the unix socket at path succeeds. Fails early if `process` exits."""

    def check() -> bool:
        if process is not None:
            process.check_alive(f"while waiting for {path}")
        return unix_socket_accepts(path)

    wait_for(check, timeout, f"unix socket {path} to accept connections")


def wait_for_tcp(host: str, port: int, timeout: float = 10.0, process: "Process | None" = None) -> None:
    """Waits until a TCP connection to host:port succeeds. Fails early if `process` exits."""

    def check() -> bool:
        if process is not None:
            process.check_alive(f"while waiting for {host}:{port}")
        with socket.create_connection((host, port), timeout=1.0):
            return True

    wait_for(check, timeout, f"TCP {host}:{port} to accept connections")


# ---------------------------------------------------------------------------------------------------------
# Workdir


def unmount_under(path: str) -> None:
    """Lazily unmounts every mount (in this mount namespace) at or below path, deepest first."""
    path = os.path.realpath(path)
    mounts = []
    try:
        with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                fields = line.split()
                if len(fields) > 4:
                    point = _unescape_mount(fields[4])
                    if point == path or point.startswith(path + "/"):
                        mounts.append(point)
    except OSError:
        return
    for point in sorted(set(mounts), key=len, reverse=True):
        subprocess.run(["umount", "--lazy", point], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)


def _unescape_mount(field: str) -> str:
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and i + 3 < len(field) and field[i + 1 : i + 4].isdigit():
            out.append(chr(int(field[i + 1 : i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


class Workdir:
    """A fresh folder /tmp/vbXXXXXXXX, removed (after unmounting anything below it) when its scope ends."""

    def __init__(self, prefix: str = "vb") -> None:
        self.path = tempfile.mkdtemp(prefix=prefix, dir=TMP_BASE)
        self._closed = False
        defer(self.cleanup)

    def join(self, *parts: str) -> str:
        return os.path.join(self.path, *parts)

    def mkdir(self, *parts: str) -> str:
        p = self.join(*parts)
        os.makedirs(p, exist_ok=True)
        return p

    def write(self, name: str, data: str | bytes, mode: int = 0o644) -> str:
        p = self.join(name)
        os.makedirs(os.path.dirname(p), exist_ok=True)
        with open(p, "wb" if isinstance(data, bytes) else "w") as f:
            f.write(data)
        os.chmod(p, mode)
        return p

    def cleanup(self) -> None:
        if self._closed:
            return
        self._closed = True
        if os.environ.get("VBRIDGE_KEEP_WORKDIR", "") not in ("", "0"):
            print(f"vbridge fixtures: keeping {self.path}", file=sys.stderr)
            return
        unmount_under(self.path)
        shutil.rmtree(self.path, ignore_errors=True)

    def __str__(self) -> str:
        return self.path

    def __fspath__(self) -> str:
        return self.path


# ---------------------------------------------------------------------------------------------------------
# Process

_PR_SET_PDEATHSIG = 1
try:
    _libc = ctypes.CDLL(None, use_errno=True)
except OSError:  # pragma: no cover
    _libc = None


def _die_with_parent() -> None:
    # Runs in the child between fork and exec: SIGKILL it if the test runner dies (e.g. a ctest timeout).
    if _libc is not None:
        _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


_live_processes: list["Process"] = []


def live_processes() -> list["Process"]:
    """Processes started by this module that have not been seen to exit."""
    return [p for p in _live_processes if p.alive()]


class Process:
    """A child process whose stdout and stderr go to <workdir>/<name>.stdout.log / .stderr.log.

    Stopped by PID only: `terminate()` sends SIGTERM, then SIGKILL after `term_timeout` seconds.
    Registered in the current cleanup scope. Started with PR_SET_PDEATHSIG=SIGKILL (unless
    die_with_parent=False) so nothing outlives a killed test runner; note that this signal follows the
    *thread* that started the process, so start processes from the main thread.
    """

    def __init__(
        self,
        workdir: Workdir | str,
        name: str,
        argv: Sequence[str],
        *,
        env: dict[str, str] | None = None,
        extra_env: dict[str, str] | None = None,
        cwd: str | None = None,
        stdin: Any = subprocess.DEVNULL,
        pass_fds: Iterable[int] = (),
        term_timeout: float = 10.0,
        die_with_parent: bool = True,
    ) -> None:
        directory = os.fspath(workdir)
        self.name = _unique_name(directory, name)
        self.argv = [os.fspath(a) for a in argv]
        self.term_timeout = term_timeout
        self.stdout_path = os.path.join(directory, f"{self.name}.stdout.log")
        self.stderr_path = os.path.join(directory, f"{self.name}.stderr.log")
        full_env = dict(os.environ if env is None else env)
        if extra_env:
            full_env.update(extra_env)
        with open(self.stdout_path, "wb") as out, open(self.stderr_path, "wb") as err:
            try:
                self.popen = subprocess.Popen(
                    self.argv,
                    stdin=stdin,
                    stdout=out,
                    stderr=err,
                    env=full_env,
                    cwd=cwd,
                    pass_fds=tuple(pass_fds),
                    start_new_session=True,
                    preexec_fn=_die_with_parent if die_with_parent else None,
                )
            except OSError as e:
                raise FixtureError(f"cannot start {self.name}: {self.argv!r}: {e}") from e
        self.pid = self.popen.pid
        _live_processes.append(self)
        defer(self.terminate)

    # -- state --

    def alive(self) -> bool:
        alive = self.popen.poll() is None
        if not alive and self in _live_processes:
            _live_processes.remove(self)
        return alive

    @property
    def returncode(self) -> int | None:
        return self.popen.poll()

    def check_alive(self, context: str = "") -> None:
        """Raises FixtureError with the logs if the process has exited."""
        if not self.alive():
            where = f" {context}" if context else ""
            raise FixtureError(f"{self.name} (pid {self.pid}) exited with {self.returncode}{where}\n{self.logs()}")

    # -- stopping --

    def send_signal(self, sig: int) -> bool:
        """Sends sig to the process by PID if it has not been reaped yet (so the PID is still ours)."""
        if self.popen.poll() is not None:
            return False
        try:
            os.kill(self.pid, sig)
        except ProcessLookupError:
            return False
        return True

    def terminate(self, timeout: float | None = None) -> int:
        """SIGTERM, wait up to timeout (default term_timeout) seconds, then SIGKILL. Returns the exit code."""
        if self.popen.poll() is None:
            self.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(self.term_timeout if timeout is None else timeout)
            except subprocess.TimeoutExpired:
                self.send_signal(signal.SIGKILL)
                self.popen.wait(30)
        self.alive()
        return self.popen.returncode

    def kill9(self) -> int:
        """SIGKILL now. Returns the exit code (-9)."""
        self.send_signal(signal.SIGKILL)
        self.popen.wait(30)
        self.alive()
        return self.popen.returncode

    def wait_exit(self, timeout: float) -> int:
        """Waits for the process to exit by itself; raises WaitTimeout (with logs) if it does not."""
        try:
            rc = self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            raise WaitTimeout(
                f"{self.name} (pid {self.pid}) still running after {timeout:g} s\n{self.logs()}"
            ) from None
        self.alive()
        return rc

    # -- output --

    def stdout(self) -> str:
        return _read_text(self.stdout_path)

    def stderr(self) -> str:
        return _read_text(self.stderr_path)

    def output(self) -> str:
        return self.stdout() + self.stderr()

    def wait_for_output(self, text: str, timeout: float = 10.0) -> None:
        """Waits until text appears in stdout or stderr; fails early (with logs) if the process exits."""

        def check() -> bool:
            if text in self.output():
                return True
            self.check_alive(f"before printing {text!r}")
            return False

        wait_for(check, timeout, f"{self.name} to print {text!r}")

    def logs(self, tail: int = 6000) -> str:
        """The end of stdout and stderr, labelled, for failure messages."""
        parts = [f"--- {self.name} (pid {self.pid}): {' '.join(self.argv)}"]
        for label, text in (("stdout", self.stdout()), ("stderr", self.stderr())):
            if len(text) > tail:
                text = "[...]\n" + text[-tail:]
            parts.append(f"--- {self.name} {label}:\n{text.rstrip()}")
        return "\n".join(parts)

    def __repr__(self) -> str:
        return f"<Process {self.name} pid={self.pid} rc={self.popen.returncode}>"


def _unique_name(directory: str, name: str) -> str:
    candidate, n = name, 1
    while os.path.exists(os.path.join(directory, f"{candidate}.stdout.log")):
        n += 1
        candidate = f"{name}-{n}"
    return candidate


def _read_text(path: str) -> str:
    try:
        with open(path, "rb") as f:
            return f.read().decode("utf-8", errors="replace")
    except OSError:
        return ""


def _ppid_map() -> dict[int, int]:
    parents = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat", "rb") as f:
                    stat = f.read()
            except OSError:
                continue
            # "pid (comm) state ppid ..." -- comm may contain spaces and parentheses.
            rest = stat[stat.rfind(b")") + 2 :].split()
            if len(rest) > 1:
                parents[int(entry)] = int(rest[1])
    return parents


def _cmdline(pid: int) -> bytes:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read()
    except OSError:
        return b""


def descendants(pid: int) -> list[int]:
    """PIDs of all current descendants of pid."""
    parents = _ppid_map()
    children: dict[int, list[int]] = {}
    for child, parent in parents.items():
        children.setdefault(parent, []).append(child)
    out, todo = [], list(children.get(pid, []))
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


# ---------------------------------------------------------------------------------------------------------
# Built binaries


def build_dir() -> str:
    """The CMake build folder: $VBRIDGE_BUILD_DIR (set by ctest), else <repo>/build."""
    env = os.environ.get("VBRIDGE_BUILD_DIR")
    if env:
        return env
    return os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "build"))


def find_binary(name: str) -> str | None:
    """Path of an executable called name in the build folder (searched recursively), or None."""
    root = build_dir()
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d != "CMakeFiles" and not d.startswith(".")]
        if name in filenames:
            p = os.path.join(dirpath, name)
            if os.access(p, os.X_OK):
                return p
    return None


# ---------------------------------------------------------------------------------------------------------
# HTTP over a unix socket (the Docker API)


class _UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._unix_path = path

    def connect(self) -> None:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(self.timeout)
        try:
            s.connect(self._unix_path)
        except OSError:
            s.close()
            raise
        self.sock = s


def unix_http(
    path: str,
    method: str,
    url: str,
    body: bytes | str | None = None,
    headers: dict[str, str] | None = None,
    timeout: float = 10.0,
) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 request over the unix socket at path. Returns (status, headers, body)."""
    conn = _UnixHTTPConnection(path, timeout)
    try:
        conn.request(method, url, body=body, headers=headers or {})
        resp = conn.getresponse()
        data = resp.read()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, data
    finally:
        conn.close()


def docker_ping(path: str, timeout: float = 2.0) -> bool:
    """True if GET /_ping on the Docker API socket at path answers 200 OK."""
    status, _, body = unix_http(path, "GET", "/_ping", timeout=timeout)
    return status == 200 and body.strip() == b"OK"


# ---------------------------------------------------------------------------------------------------------
# docker CLI


def docker_cli() -> str | None:
    """The docker client: $VBRIDGE_DOCKER_CLI, else Debian's /usr/bin/docker, else `docker` on PATH."""
    env = os.environ.get("VBRIDGE_DOCKER_CLI")
    if env:
        return env
    if os.access("/usr/bin/docker", os.X_OK):
        return "/usr/bin/docker"
    return shutil.which("docker")


@functools.lru_cache(maxsize=None)
def _docker_config_dir() -> str:
    # An empty client config, so a user's ~/.docker (contexts, credential helpers) cannot change the tests.
    d = os.environ.get("VBRIDGE_DOCKER_CONFIG") or os.path.join(TMP_BASE, f"vbridge-docker-config-{os.getuid()}")
    os.makedirs(d, mode=0o700, exist_ok=True)
    return d


def docker_env(host_socket: str, extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment for a docker CLI talking to the daemon at the unix socket host_socket."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("DOCKER_")}
    env["DOCKER_HOST"] = host_socket if host_socket.startswith("unix://") else "unix://" + os.fspath(host_socket)
    env["DOCKER_CONFIG"] = _docker_config_dir()
    env["DOCKER_CLI_HINTS"] = "false"
    if extra:
        env.update(extra)
    return env


def docker(
    args: Sequence[str],
    host_socket: str,
    input: str | bytes | None = None,  # noqa: A002 - mirrors subprocess.run
    timeout: float = 120.0,
    env: dict[str, str] | None = None,
    check: bool = False,
    binary: bool | None = None,
) -> subprocess.CompletedProcess:
    """Runs `docker ARGS` against the daemon at host_socket (a path or unix:// URL).

    Output is captured (text, unless input is bytes or binary=True). With check=True a non-zero exit raises
    FixtureError quoting the command, stdout and stderr.
    """
    cli = docker_cli()
    if cli is None:
        raise FixtureError("no docker client found (install docker.io or set VBRIDGE_DOCKER_CLI)")
    if binary is None:
        binary = isinstance(input, bytes)
    if binary and isinstance(input, str):
        input = input.encode()  # noqa: A001
    argv = [cli, *[os.fspath(a) for a in args]]
    try:
        result = subprocess.run(
            argv,
            input=input,
            capture_output=True,
            text=not binary,
            timeout=timeout,
            env=docker_env(host_socket, env),
            check=False,
        )
    except subprocess.TimeoutExpired as e:
        raise FixtureError(f"`{' '.join(argv)}` did not finish within {timeout:g} s") from e
    if check and result.returncode != 0:
        raise FixtureError(
            f"`{' '.join(argv)}` exited with {result.returncode}\nstdout: {result.stdout!r}\nstderr: {result.stderr!r}"
        )
    return result


# ---------------------------------------------------------------------------------------------------------
# busybox image

BUSYBOX = "/bin/busybox"
REQUIRED_APPLETS = (
    "sh", "echo", "cat", "sleep", "ls", "wc", "md5sum", "sha256sum", "head", "dd", "true", "env", "yes",
)  # fmt: skip


@functools.lru_cache(maxsize=4)
def busybox_rootfs_tar(busybox: str = BUSYBOX) -> bytes:
    """A root filesystem tarball: a static busybox with a symlink in /bin for each of its applets."""
    if not os.access(busybox, os.X_OK):
        raise FixtureError(f"{busybox} not found (install busybox-static)")
    listed = subprocess.run([busybox, "--list"], capture_output=True, text=True, check=False).stdout.split()
    applets = sorted((set(listed) | set(REQUIRED_APPLETS)) - {"busybox"})
    with open(busybox, "rb") as f:
        binary = f.read()

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tar:

        def add(name: str, kind: bytes, mode: int, data: bytes = b"", link: str = "") -> None:
            info = tarfile.TarInfo(name)
            info.type, info.mode, info.mtime, info.uid, info.gid = kind, mode, 0, 0, 0
            info.uname = info.gname = "root"
            info.linkname = link
            info.size = len(data) if kind == tarfile.REGTYPE else 0
            tar.addfile(info, io.BytesIO(data) if kind == tarfile.REGTYPE else None)

        for d, mode in (("bin", 0o755), ("dev", 0o755), ("etc", 0o755), ("proc", 0o555), ("sys", 0o555),
                        ("root", 0o700), ("tmp", 0o1777), ("var", 0o755), ("var/tmp", 0o1777)):  # fmt: skip
            add(d, tarfile.DIRTYPE, mode)
        add("bin/busybox", tarfile.REGTYPE, 0o755, binary)
        for applet in applets:
            if "/" not in applet:
                add(f"bin/{applet}", tarfile.SYMTYPE, 0o777, link="busybox")
        add("etc/passwd", tarfile.REGTYPE, 0o644, b"root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534::/:/bin/false\n")
        add("etc/group", tarfile.REGTYPE, 0o644, b"root:x:0:\nnogroup:x:65534:\n")
    return buf.getvalue()


def make_busybox_image(docker_fn: Callable[..., subprocess.CompletedProcess], tag: str = "vbridge-busybox") -> str:
    """Imports the busybox rootfs as image `tag` (nothing is pulled) and returns tag.

    docker_fn is called like `docker_fn(args, input=bytes)`; pass `Dockerd.docker` or a
    `functools.partial(docker, host_socket=...)`.
    """
    result = docker_fn(
        ["import", "--change", "ENV PATH=/bin", "--change", 'CMD ["sh"]', "-", tag],
        input=busybox_rootfs_tar(),
    )
    if result.returncode != 0:
        raise FixtureError(f"docker import of {tag} failed ({result.returncode}): {result.stderr!r}")
    return tag


# ---------------------------------------------------------------------------------------------------------
# Network + mount namespace


class Netns:
    """A new network and mount namespace (private propagation, loopback up), held by a sleeping process.

    `wrap(argv)` turns a command into one that runs inside (nsenter, which execs without forking, so a
    Process of it has the PID of the real program); `run` and `spawn` are shortcuts. The namespace lives while
    the holder or anything started inside lives; the holder is stopped with its scope.
    """

    def __init__(self, workdir: Workdir | str, name: str = "netns") -> None:
        script = "ip link set lo up && echo ready && exec sleep infinity"
        self.holder = Process(
            workdir,
            name,
            ["unshare", "--net", "--mount", "--propagation", "private", "--", "sh", "-c", script],
            extra_env={"PATH": SBIN_PATH},
            term_timeout=5.0,
        )
        self.holder.wait_for_output("ready", timeout=10.0)

    @property
    def pid(self) -> int:
        return self.holder.pid

    def wrap(self, argv: Sequence[str], cwd: str | None = None) -> list[str]:
        # Entering a mount namespace resets the working directory, so pass it explicitly.
        wd = os.fspath(cwd) if cwd is not None else os.getcwd()
        return ["nsenter", f"--target={self.pid}", "--net", "--mount", f"--wd={wd}", "--", *map(os.fspath, argv)]

    def run(self, argv: Sequence[str], cwd: str | None = None, **kwargs: Any) -> subprocess.CompletedProcess:
        """subprocess.run inside the namespace (capture_output and text default to True)."""
        kwargs.setdefault("capture_output", True)
        kwargs.setdefault("text", True)
        kwargs.setdefault("timeout", 60)
        return subprocess.run(self.wrap(argv, cwd), check=kwargs.pop("check", False), **kwargs)

    def spawn(self, workdir: Workdir | str, name: str, argv: Sequence[str], cwd: str | None = None,
              **kwargs: Any) -> Process:  # fmt: skip
        """A Process running argv inside the namespace."""
        return Process(workdir, name, self.wrap(argv, cwd), **kwargs)

    def close(self) -> None:
        self.holder.terminate()

    @staticmethod
    def isolated(argv: Sequence[str]) -> list[str]:
        """A one-off command in its own new network + mount namespace with loopback up."""
        return ["unshare", "--net", "--mount", "--propagation", "private", "--",
                "sh", "-c", 'ip link set lo up && exec "$@"', "sh", *map(os.fspath, argv)]  # fmt: skip


# ---------------------------------------------------------------------------------------------------------
# dockerd

DOCKERD = "/usr/sbin/dockerd"
CONTAINERD = "/usr/bin/containerd"


def dockerd_unavailable_reason() -> str | None:
    """Why Dockerd cannot run on this machine, or None if it can."""
    if os.geteuid() != 0:
        return "dockerd needs root"
    for tool in (DOCKERD, CONTAINERD):
        if not os.access(tool, os.X_OK):
            return f"{tool} not found (tools/setup.sh installs docker.io)"
    for tool in ("runc", "containerd-shim-runc-v2"):
        if shutil.which(tool, path=SBIN_PATH) is None:
            return f"{tool} not found (tools/setup.sh installs docker.io)"
    if docker_cli() is None:
        return "no docker client found"
    return None


def require_dockerd() -> None:
    """Raises unittest.SkipTest if dockerd cannot run here, or FixtureError in strict mode (CI)."""
    reason = dockerd_unavailable_reason()
    if reason:
        if strict_mode():
            raise FixtureError(f"dockerd required but unavailable: {reason}")
        raise unittest.SkipTest(reason)


class Dockerd:
    """Debian's dockerd with its own containerd, both under <workdir>/<name>/, isolated from any other instance.

    dockerd would start a private ("managed") containerd by itself, but only if no system containerd
    listens on /run/containerd/containerd.sock -- otherwise it silently shares that one. So this fixture
    always starts its own containerd (generated config, root/state/socket under the instance folder) and
    passes `--containerd`. dockerd also gets its own `--config-file`, so /etc/docker/daemon.json is ignored.

    `netns`: run both daemons inside that Netns (containers then see only its network).
    `storage_driver`: default $VBRIDGE_DOCKER_STORAGE_DRIVER or vfs. vfs works on any filesystem; overlay2
    works on these machines too and makes `docker run` about four times faster (~0.25 s instead of ~1 s).
    """

    def __init__(
        self,
        workdir: Workdir | str,
        name: str = "docker",
        *,
        netns: Netns | None = None,
        storage_driver: str | None = None,
        extra_args: Sequence[str] = (),
        config: dict[str, Any] | None = None,
    ) -> None:
        self.root = os.path.join(os.fspath(workdir), name)
        os.makedirs(self.root)
        self.netns = netns
        self.socket_path = os.path.join(self.root, "docker.sock")
        self.host = "unix://" + self.socket_path
        self.data_root = os.path.join(self.root, "data")
        self.exec_root = os.path.join(self.root, "exec")
        self.pidfile = os.path.join(self.root, "docker.pid")
        self.config_file = os.path.join(self.root, "daemon.json")
        self.containerd_root = os.path.join(self.root, "ctd")
        self.containerd_socket = os.path.join(self.containerd_root, "containerd.sock")
        self.storage_driver = storage_driver or os.environ.get("VBRIDGE_DOCKER_STORAGE_DRIVER") or "vfs"
        self.extra_args = list(extra_args)
        self.config = dict(config or {})
        self.containerd: Process | None = None
        self.dockerd: Process | None = None
        if len(self.containerd_socket) > 100:
            raise FixtureError(f"socket path too long: {self.containerd_socket}")

    def dockerd_argv(self) -> list[str]:
        return [
            DOCKERD,
            "--iptables=false",
            "--ip6tables=false",
            "--ip-forward=false",
            "--ip-masq=false",
            "--bridge=none",
            f"--storage-driver={self.storage_driver}",
            "-H", self.host,
            "--data-root", self.data_root,
            "--exec-root", self.exec_root,
            "--pidfile", self.pidfile,
            "--config-file", self.config_file,
            "--containerd", self.containerd_socket,
            "--shutdown-timeout", "2",
            *self.extra_args,
        ]  # fmt: skip

    def _containerd_config(self) -> str:
        r = self.containerd_root
        return "\n".join([
            "version = 2",
            f'root = "{r}/root"',
            f'state = "{r}/state"',
            'disabled_plugins = ["io.containerd.grpc.v1.cri"]',
            "[grpc]",
            f'  address = "{self.containerd_socket}"',
            "[ttrpc]",
            f'  address = "{self.containerd_socket}.ttrpc"',
            "[debug]",
            '  address = ""',
            "[plugins]",
            '  [plugins."io.containerd.internal.v1.opt"]',
            f'    path = "{r}/opt"',
            '  [plugins."io.containerd.runtime.v1.linux"]',
            f'    runtime_root = "{r}/runc-v1"',
            "",
        ])  # fmt: skip

    def _wrap(self, argv: list[str]) -> list[str]:
        return self.netns.wrap(argv, cwd=self.root) if self.netns else argv

    def start(self, timeout: float = 60.0) -> "Dockerd":
        """Starts containerd and dockerd; returns when GET /_ping answers (or raises with the logs)."""
        if self.dockerd is not None:
            raise FixtureError("Dockerd already started")
        defer(self._sweep_shims)  # runs last, also when the start fails half-way
        deadline = time.monotonic() + timeout
        os.makedirs(self.containerd_root, exist_ok=True)
        config = os.path.join(self.containerd_root, "config.toml")
        with open(config, "w") as f:
            f.write(self._containerd_config())
        with open(self.config_file, "w") as f:
            json.dump(self.config, f)
        env = {"PATH": SBIN_PATH}
        self.containerd = Process(
            self.root, "containerd", self._wrap([CONTAINERD, "--config", config]), extra_env=env, cwd=self.root,
            term_timeout=10.0,
        )  # fmt: skip
        wait_for_unix_socket(self.containerd_socket, max(1.0, deadline - time.monotonic()), process=self.containerd)
        self.dockerd = Process(
            self.root, "dockerd", self._wrap(self.dockerd_argv()), extra_env=env, cwd=self.root, term_timeout=30.0
        )
        defer(self.stop)  # runs before the processes' own cleanup, to kill the containers first

        def ready() -> bool:
            assert self.dockerd is not None
            self.dockerd.check_alive("during startup")
            return docker_ping(self.socket_path)

        try:
            wait_for(ready, max(1.0, deadline - time.monotonic()), f"dockerd to answer GET /_ping on {self.socket_path}",
                     ignore=(OSError, http.client.HTTPException))  # fmt: skip
        except WaitTimeout as e:
            raise WaitTimeout(f"{e}\n{self.logs()}") from None
        return self

    def ping(self) -> bool:
        try:
            return docker_ping(self.socket_path)
        except (OSError, http.client.HTTPException):
            return False

    def docker(self, args: Sequence[str], **kwargs: Any) -> subprocess.CompletedProcess:
        """`docker ARGS` against this daemon; keyword arguments as for `docker()`."""
        return docker(args, self.socket_path, **kwargs)

    def logs(self) -> str:
        return "\n".join(p.logs() for p in (self.dockerd, self.containerd) if p is not None)

    def kill_all_containers(self) -> None:
        """SIGKILLs every running container through the API (best effort).

        dockerd's own shutdown sends SIGTERM and waits each container's stop timeout (10 s by default), and a
        process that is PID 1 in its container, like `sleep`, ignores SIGTERM.
        """
        try:
            status, _, body = unix_http(self.socket_path, "GET", "/containers/json", timeout=5)
            if status != 200:
                return
            for container in json.loads(body):
                unix_http(self.socket_path, "POST", f"/containers/{container['Id']}/kill", timeout=5)
        except (OSError, http.client.HTTPException, ValueError, KeyError):
            pass

    def shim_pids(self) -> list[int]:
        """PIDs of the containerd shims of this instance (one per running container)."""
        needle = self.containerd_socket.encode()
        pids = []
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                argv = _cmdline(int(entry)).split(b"\0")
                if os.path.basename(argv[0]).startswith(b"containerd-shim") and needle in argv:
                    pids.append(int(entry))
        return pids

    def stop(self) -> None:
        """Kills the containers, stops dockerd, then containerd, then kills any shim left behind."""
        if self.dockerd is not None:
            if self.dockerd.alive():
                self.kill_all_containers()
            self.dockerd.terminate()
        if self.containerd is not None:
            self.containerd.terminate()
        self._sweep_shims()

    def _sweep_shims(self) -> None:
        # Only after a crash or SIGKILL of dockerd: shims (and their containers) outlive containerd.
        # They are recognised by our own containerd socket on their command line and killed by PID.
        for shim in self.shim_pids():
            for pid in [*descendants(shim), shim]:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)

    def __enter__(self) -> "Dockerd":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()


# ---------------------------------------------------------------------------------------------------------
# TestCase base


class FixtureTestCase(unittest.TestCase):
    """A TestCase with a Workdir per test (`self.workdir`) and per class (`cls.class_workdir`).

    Everything started during a test is stopped in tearDown; everything started in setUpClass is stopped
    after tearDownClass. Subclasses that override setUp/setUpClass must call super() first.
    """

    class_workdir: Workdir

    @classmethod
    def setUpClass(cls) -> None:
        super().setUpClass()
        _scopes.push()
        cls.addClassCleanup(_scopes.pop)
        cls.class_workdir = Workdir()

    def setUp(self) -> None:
        super().setUp()
        _scopes.push()
        self.addCleanup(_scopes.pop)
        self.workdir = Workdir()

    def start_dockerd(self, **kwargs: Any) -> Dockerd:
        """A started Dockerd in this test's workdir (skips, or fails in strict mode, if unavailable)."""
        require_dockerd()
        return Dockerd(self.workdir, **kwargs).start()
