"""Shared pieces of the vbridge VM tools (image.py, launch.py): paths, errors, progress, disk space.

Python 3.9+ standard library only, so the tools run on a fresh Debian machine and can be called from a C++
`vbridge` CLI as plain programs.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import re
import shutil
import signal
import sys
import time
from pathlib import Path
from typing import Iterator, Optional

GiB = 1 << 30
MiB = 1 << 20


class VmError(Exception):
    """An error with a message meant for the user (no traceback is shown)."""

    def __init__(self, message: str, hint: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message + (f"\n  hint: {self.hint}" if self.hint else "")


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def parse_size(text: str) -> int:
    """'4G', '512M', '2048' (bytes) -> bytes."""
    m = re.fullmatch(r"\s*(\d+)\s*([KMGT]?)(i?B)?\s*", text, re.IGNORECASE)
    if not m:
        raise VmError(f"bad size {text!r}: use a number with an optional K, M, G or T suffix")
    return int(m.group(1)) << {"": 0, "K": 10, "M": 20, "G": 30, "T": 40}[m.group(2).upper()]


class Progress:
    """One line per stage, '[  12.3s] stage', on stderr (stdout stays free for results)."""

    def __init__(self, prefix: str = "vbridge vm", stream=None, quiet: bool = False) -> None:
        self.start = time.monotonic()
        self.prefix = prefix
        self.stream = stream or sys.stderr
        self.quiet = quiet

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def __call__(self, message: str) -> None:
        if self.quiet:
            return
        self.stream.write(f"{self.prefix}: [{self.elapsed():6.1f}s] {message}\n")
        self.stream.flush()


def cache_root() -> Path:
    """$VBRIDGE_CACHE_DIR, else ${XDG_CACHE_HOME:-~/.cache}/vbridge."""
    if os.environ.get("VBRIDGE_CACHE_DIR"):
        return Path(os.environ["VBRIDGE_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "vbridge"


def runtime_root() -> Path:
    """Where instances keep sockets, pidfiles and logs. Short paths: unix socket paths are limited to 107 bytes.

    $VBRIDGE_RUNTIME_DIR, else $XDG_RUNTIME_DIR/vbridge, else /run/vbridge (root), else
    /tmp/vbridge-<uid>/vbridge: the same folders as tools/vbridge's state_dir(), so an instance's VM files and
    its host agent's sockets share <runtime>/<name>/.
    """
    if os.environ.get("VBRIDGE_RUNTIME_DIR"):
        return Path(os.environ["VBRIDGE_RUNTIME_DIR"])
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if xdg and os.path.isdir(xdg) and os.access(xdg, os.W_OK):
        return Path(xdg) / "vbridge"
    if os.geteuid() == 0 and os.path.isdir("/run") and os.access("/run", os.W_OK):
        return Path("/run/vbridge")
    return Path(f"/tmp/vbridge-{os.geteuid()}") / "vbridge"


def existing_ancestor(path: Path) -> Path:
    path = Path(os.path.abspath(path))
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def free_bytes(path: Path) -> int:
    st = os.statvfs(existing_ancestor(path))
    return st.f_bavail * st.f_frsize


def check_free_space(path: Path, need: int, what: str) -> None:
    """Fails with how much is needed and where, before any work starts."""
    have = free_bytes(path)
    if have < need:
        where = existing_ancestor(path)
        raise VmError(
            f"not enough free disk space for {what}: need {human(need)} in {path} "
            f"(filesystem of {where}), only {human(have)} free",
            "free some space, or point VBRIDGE_CACHE_DIR (or --cache-dir) at a filesystem with room")


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            block = f.read(chunk)
            if not block:
                break
            h.update(block)
    return h.hexdigest()


def write_json_atomic(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def read_json(path: Path) -> Optional[dict]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


@contextlib.contextmanager
def file_lock(path: Path, what: str, wait: bool = True, progress: Optional[Progress] = None) -> Iterator[None]:
    """An exclusive flock on `path` (created if needed); waits (telling so) or fails when another holder has it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise
            if not wait:
                raise VmError(f"{what} is busy: another vbridge process holds {path}") from None
            if progress:
                progress(f"waiting for another vbridge process to finish with {what}")
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def which_or_error(program: str, package: str, purpose: str) -> str:
    found = shutil.which(program, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin")
    if not found:
        raise VmError(f"{program} not found: it is needed {purpose}",
                      f"install Debian's {package} package: apt-get install --no-install-recommends {package}"
                      " (tools/setup.sh does this)")
    return found


def version_key(text: str) -> list:
    """Sort key for version strings such as 6.1.0-56-amd64 (numbers compare as numbers)."""
    return [(0, int(p)) if p.isdigit() else (1, p) for p in re.split(r"(\d+)", text) if p]


def find_kernels() -> list[str]:
    """Versions of installed kernels that have both /boot/vmlinuz-<ver> and /lib/modules/<ver>/modules.dep."""
    found = []
    for vmlinuz in Path("/boot").glob("vmlinuz-*"):
        ver = vmlinuz.name[len("vmlinuz-"):]
        if (Path("/lib/modules") / ver / "modules.dep").is_file():
            found.append(ver)
    return sorted(found, key=version_key)


def pick_kernel(requested: Optional[str] = None) -> str:
    kernels = find_kernels()
    if requested:
        if requested not in kernels:
            raise VmError(f"kernel {requested} not found: need /boot/vmlinuz-{requested} and "
                          f"/lib/modules/{requested}/modules.dep (installed: {', '.join(kernels) or 'none'})")
        return requested
    if not kernels:
        raise VmError("no kernel for the guest: no /boot/vmlinuz-<ver> with /lib/modules/<ver>",
                      "install Debian's kernel package: apt-get install --no-install-recommends linux-image-amd64"
                      " (tools/setup.sh does this)")
    return kernels[-1]


def main_wrapper(fn) -> int:
    """Runs a CLI entry point: VmError -> 'vbridge vm: error: ...' on stderr and exit status 1.

    SIGINT and SIGTERM raise KeyboardInterrupt, so an interrupted build or boot cleans up after itself
    (stops debootstrap or QEMU, removes its temporary folder) even when started in the background."""
    def interrupt(signum, _frame):
        raise KeyboardInterrupt(f"signal {signum}")

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, interrupt)
    try:
        return fn() or 0
    except VmError as e:
        sys.stderr.write(f"vbridge vm: error: {e}\n")
        return 1
    except KeyboardInterrupt:
        sys.stderr.write("vbridge vm: interrupted\n")
        return 130
