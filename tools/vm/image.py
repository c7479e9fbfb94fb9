#!/usr/bin/env python3
"""vbridge guest image builder: Debian's kernel, a busybox initramfs and a debootstrap root disk with docker.io
and the (statically linked) guest agent.

    image.py build [--agent PATH] [--release bookworm] [--cache-dir DIR] [--json]   build or reuse; prints the dir
    image.py path  [--agent PATH] ...                                                the dir if cached, else exit 1
    image.py list | prune [--keep N]

An image is a folder <cache>/images/<key>/ holding
    vmlinuz              the kernel of an installed linux-image package (/boot/vmlinuz-<ver>)
    vmlinux              the same kernel uncompressed, booted directly (PVH): ~6 s faster under TCG
    initramfs.cpio.gz    busybox-static + virtio/ext4 modules; /init mounts /dev/vda and switch_roots
    rootfs.ext4          debootstrap tree (mke2fs -d, no loop devices) with /sbin/vbridge-init,
                         the modules dockerd needs and /usr/local/bin/vbridge-guest
    manifest.json        the inputs, sizes and build times
Building happens in two layers, each cached under a key that hashes its inputs:
    base-<key>   release, package list, kernel, init scripts, disk size  (debootstrap: about a minute)
    <key>        base key + sha256 of the guest agent binary ("none" without one)  (a copy + debugfs: seconds)
so a new agent build costs seconds, not a debootstrap. Both are built in a temporary folder beside the cache
and renamed into place when complete: a half-built image is never reused.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Optional

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from vmcommon import (GiB, MiB, Progress, VmError, cache_root, check_free_space, file_lock, human,  # noqa: E402
                      main_wrapper, parse_size, pick_kernel, read_json, sha256_file, which_or_error,
                      write_json_atomic)

HERE = Path(__file__).resolve().parent
GUEST_DIR = HERE / "guest"

# Bump when the recipe changes in a way the inputs below do not show; every cached image is then rebuilt.
RECIPE_VERSION = 2

DEFAULT_RELEASE = "bookworm"
def apt_mirror() -> str:
    """The Debian archive this machine's apt uses (the first deb URI in its sources), so debootstrap fetches
    from the same place apt-get does."""
    sources = [Path("/etc/apt/sources.list"), *sorted(Path("/etc/apt/sources.list.d").glob("*.sources")),
               *sorted(Path("/etc/apt/sources.list.d").glob("*.list"))]
    for path in sources:
        try:
            lines = path.read_text(errors="replace").splitlines()
        except OSError:
            continue
        for line in lines:
            words = line.split("#", 1)[0].split()
            if path.suffix == ".sources" and words[:1] == ["URIs:"] and len(words) > 1:
                return words[1].rstrip("/")
            if words[:1] == ["deb"]:
                uris = [w for w in words[1:] if "://" in w]
                if uris:
                    return uris[0].rstrip("/")
    return ""


DEFAULT_MIRROR = os.environ.get("VBRIDGE_DEBIAN_MIRROR") or apt_mirror()
DEFAULT_DISK_SIZE = "4G"
AGENT_PATH_IN_GUEST = "/usr/local/bin/vbridge-guest"

# debootstrap --variant=minbase --include=...: dockerd and its runtime, module loading, the tools the init uses.
DEFAULT_PACKAGES = [
    "docker.io", "containerd", "runc", "tini", "iptables",  # the engine (iptables: dockerd's dependency)
    "kmod", "iproute2", "procps", "util-linux",  # modprobe, ip link set lo up, ps, mountpoint
    "inotify-tools",  # inotifywait: checks of the file-event feature inside the guest
]

# Loaded by the initramfs, in `modprobe --show-depends` order, to reach the root disk.
INITRAMFS_MODULES = ["virtio_pci", "virtio_blk", "crc32c_generic", "ext4"]

# Copied (with their dependencies) into the root disk; vbridge-init modprobes what it needs.
ROOTFS_MODULES = [
    "overlay", "bridge", "br_netfilter", "veth", "nf_tables", "nft_compat", "nf_nat", "nf_conntrack",
    "xt_conntrack", "xt_MASQUERADE", "xt_addrtype", "iptable_nat", "iptable_filter", "ip6table_nat",
    "ip6table_filter", "9pnet_virtio", "9p", "virtio_console", "vmw_vsock_virtio_transport", "vsock_loopback",
    "button", "evdev", "fuse", "tun", "loop", "dummy", "virtio_rng",
    # NETLINK_SOCK_DIAG dumps of TCP and UDP sockets: the guest agent's port watcher.
    "inet_diag", "tcp_diag", "udp_diag",
]

# Space a base build needs at its peak: the .deb cache, the debootstrap tree and the disk image built from it.
BASE_BUILD_SPACE = 2 * GiB


# ---------------------------------------------------------------------------------------------------------------
# inputs and keys
# ---------------------------------------------------------------------------------------------------------------

@dataclass
class ImageSpec:
    release: str = DEFAULT_RELEASE
    mirror: str = DEFAULT_MIRROR
    packages: list[str] = field(default_factory=lambda: list(DEFAULT_PACKAGES))
    kernel: Optional[str] = None  # version; None = newest installed
    agent: Optional[str] = None  # host path of the guest agent binary; None = image without agent
    disk_size: str = DEFAULT_DISK_SIZE
    cache_dir: Optional[str] = None  # default: cache_root()

    def images_dir(self) -> Path:
        return (Path(self.cache_dir) if self.cache_dir else cache_root()) / "images"

    def debs_dir(self) -> Path:
        return (Path(self.cache_dir) if self.cache_dir else cache_root()) / "debs" / self.release


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def base_inputs(spec: ImageSpec, kernel: str) -> dict:
    return {
        "recipe": RECIPE_VERSION,
        "release": spec.release,
        "packages": sorted(set(spec.packages)),
        "kernel": kernel,
        "vmlinuz_sha256": sha256_file(Path(f"/boot/vmlinuz-{kernel}")),
        "initramfs_modules": INITRAMFS_MODULES,
        "rootfs_modules": ROOTFS_MODULES,
        "scripts": {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(GUEST_DIR.iterdir())
                    if p.is_file()},
        "busybox_sha256": sha256_file(Path(busybox_path())),
        "disk_size": parse_size(spec.disk_size),
    }


def agent_digest(agent: Optional[str]) -> str:
    if not agent:
        return "none"
    path = Path(agent)
    if not path.is_file():
        raise VmError(f"guest agent binary {agent} not found",
                      "build it (statically linked, see tools/vm/README.md) or leave out --agent to boot without it")
    return sha256_file(path)


def image_keys(spec: ImageSpec) -> tuple[str, str, dict, str]:
    """(base key, image key, base inputs, agent sha256)."""
    kernel = pick_kernel(spec.kernel)
    inputs = base_inputs(spec, kernel)
    base_key = _digest(inputs)
    agent_sha = agent_digest(spec.agent)
    return base_key, _digest({"base": base_key, "agent": agent_sha}), inputs, agent_sha


def busybox_path() -> str:
    for candidate in ("/bin/busybox", "/usr/bin/busybox"):
        if os.path.isfile(candidate) and is_static_elf(candidate):
            return candidate
    raise VmError("a statically linked busybox is needed for the initramfs",
                  "apt-get install --no-install-recommends busybox-static (tools/setup.sh does this)")


def is_static_elf(path: str) -> bool:
    """True for an ELF file without a PT_INTERP program header (no dynamic loader needed)."""
    with open(path, "rb") as f:
        head = f.read(64)
        if head[:4] != b"\x7fELF" or head[4] != 2:  # 64-bit only
            return False
        little = head[5] == 1
        order = "little" if little else "big"
        phoff = int.from_bytes(head[32:40], order)
        phentsize = int.from_bytes(head[54:56], order)
        phnum = int.from_bytes(head[56:58], order)
        f.seek(phoff)
        table = f.read(phentsize * phnum)
    for i in range(phnum):
        if int.from_bytes(table[i * phentsize:i * phentsize + 4], order) == 3:  # PT_INTERP
            return False
    return True


# ---------------------------------------------------------------------------------------------------------------
# kernel modules
# ---------------------------------------------------------------------------------------------------------------

def module_files(kernel: str, names: Iterable[str], warn: Callable[[str], None]) -> list[str]:
    """Module files (relative to /lib/modules/<kernel>) of `names` and their dependencies, dependencies first."""
    ordered: list[str] = []
    root = f"/lib/modules/{kernel}/"
    for name in names:
        r = subprocess.run(["modprobe", "-S", kernel, "--show-depends", name], capture_output=True, text=True)
        if r.returncode != 0:
            warn(f"module {name} not found for kernel {kernel}; left out")
            continue
        for line in r.stdout.splitlines():
            parts = line.split()
            if len(parts) >= 2 and parts[0] == "insmod" and parts[1].startswith(root):
                rel = parts[1][len(root):]
                if rel not in ordered:
                    ordered.append(rel)
    return ordered


def read_module(kernel: str, rel: str) -> tuple[str, bytes]:
    """(name without compression suffix, uncompressed bytes): busybox insmod wants plain .ko files."""
    data = Path(f"/lib/modules/{kernel}/{rel}").read_bytes()
    if rel.endswith(".xz"):
        import lzma
        return rel[:-3], lzma.decompress(data)
    if rel.endswith(".gz"):
        return rel[:-3], gzip.decompress(data)
    if rel.endswith(".zst"):
        out = subprocess.run(["zstd", "-dc"], input=data, capture_output=True, check=True).stdout
        return rel[:-4], out
    return rel, data


def extract_vmlinux(kernel: str, out: Path) -> Optional[str]:
    """Writes the uncompressed ELF kernel for PVH boot (QEMU -kernel with an ELF that has a PVH note starts it
    directly: no real-mode setup and no in-guest decompression, about 6 s less per boot under TCG). Returns None
    on success, else why it was left out (the launcher then boots vmlinuz)."""
    config = Path(f"/boot/config-{kernel}")
    if config.is_file() and "CONFIG_PVH=y" not in config.read_text(errors="replace"):
        return "kernel built without CONFIG_PVH"
    data = Path(f"/boot/vmlinuz-{kernel}").read_bytes()

    def xz(chunk: bytes) -> bytes:
        import lzma
        return lzma.LZMADecompressor(format=lzma.FORMAT_XZ).decompress(chunk)

    def gz(chunk: bytes) -> bytes:
        import zlib
        return zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(chunk)

    def zst(chunk: bytes) -> bytes:
        return subprocess.run(["zstd", "-dc"], input=chunk, capture_output=True).stdout

    for magic, fn in ((b"\xfd7zXZ\x00", xz), (b"\x1f\x8b\x08", gz), (b"\x28\xb5\x2f\xfd", zst)):
        i = data.find(magic)
        while i >= 0:
            try:
                elf = fn(data[i:])
            except Exception:  # noqa: BLE001 - not a compressed stream at this offset
                elf = b""
            if elf[:4] == b"\x7fELF":
                out.write_bytes(elf)
                return None
            i = data.find(magic, i + 1)
    return "no compressed ELF kernel found inside vmlinuz"


# ---------------------------------------------------------------------------------------------------------------
# initramfs (cpio "newc", written here: no cpio binary and no root needed)
# ---------------------------------------------------------------------------------------------------------------

class CpioWriter:
    def __init__(self) -> None:
        self.buf = io.BytesIO()
        self.ino = 1
        self.dirs: set[str] = set()

    def _entry(self, name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0)) -> None:
        encoded = name.encode() + b"\0"
        fields = [self.ino, mode, 0, 0, 2 if mode & 0o170000 == 0o040000 else 1, 0, len(data), 0, 0,
                  rdev[0], rdev[1], len(encoded), 0]
        self.ino += 1
        self.buf.write(b"070701" + b"".join(b"%08x" % v for v in fields) + encoded)
        self.buf.write(b"\0" * (-self.buf.tell() % 4))
        self.buf.write(data)
        self.buf.write(b"\0" * (-self.buf.tell() % 4))

    def dir(self, name: str) -> None:
        parts = name.strip("/").split("/")
        for i in range(1, len(parts) + 1):
            d = "/".join(parts[:i])
            if d and d not in self.dirs:
                self.dirs.add(d)
                self._entry(d, 0o040755)

    def file(self, name: str, data: bytes, mode: int = 0o644) -> None:
        self.dir(os.path.dirname(name))
        self._entry(name, 0o100000 | mode, data)

    def symlink(self, name: str, target: str) -> None:
        self.dir(os.path.dirname(name))
        self._entry(name, 0o120777, target.encode())

    def chardev(self, name: str, major: int, minor: int, mode: int = 0o600) -> None:
        self.dir(os.path.dirname(name))
        self._entry(name, 0o020000 | mode, rdev=(major, minor))

    def finish(self) -> bytes:
        self._entry("TRAILER!!!", 0)
        return self.buf.getvalue()


def build_initramfs(kernel: str, out: Path, warn: Callable[[str], None]) -> int:
    cpio = CpioWriter()
    for d in ("bin", "sbin", "usr/bin", "usr/sbin", "proc", "sys", "dev", "newroot", "tmp", "etc/vbridge"):
        cpio.dir(d)
    cpio.chardev("dev/console", 5, 1)
    cpio.chardev("dev/null", 1, 3, 0o666)
    cpio.file("bin/busybox", Path(busybox_path()).read_bytes(), 0o755)
    cpio.symlink("bin/sh", "busybox")
    cpio.file("init", (GUEST_DIR / "initramfs-init.sh").read_bytes(), 0o755)
    listed = []
    for rel in module_files(kernel, INITRAMFS_MODULES, warn):
        name, data = read_module(kernel, rel)
        cpio.file(f"lib/modules/{name}", data)
        listed.append(name)
    cpio.file("etc/vbridge/modules", ("\n".join(listed) + "\n").encode())
    raw = cpio.finish()
    out.write_bytes(gzip.compress(raw, compresslevel=6, mtime=0))
    return len(listed)


# ---------------------------------------------------------------------------------------------------------------
# root filesystem
# ---------------------------------------------------------------------------------------------------------------

# debootstrap's own summary lines (shown as they come) and its per-package lines (shown once per phase).
DEBOOTSTRAP_SUMMARY = re.compile(
    r"I: (Retrieving Release|Checking component|Resolving dependencies|Installing core packages"
    r"|Unpacking required packages|Configuring required packages|Unpacking the base system"
    r"|Configuring the base system|Base system installed)")
DEBOOTSTRAP_PER_PACKAGE = {"Retrieving": "downloading packages", "Validating": "downloading packages",
                           "Extracting": "extracting packages"}


def run_logged(cmd: list[str], log, progress: Progress, label: str, on_line: Optional[Callable[[str], None]] = None,
               env: Optional[dict] = None, heartbeat: float = 15.0) -> None:
    """Runs `cmd`, appends its output to `log`, calls on_line per line, prints a heartbeat while it runs."""
    log.write(f"$ {' '.join(cmd)}\n")
    log.flush()
    started = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace",
                            env=env, start_new_session=True)
    last = [time.monotonic()]
    lines: list[str] = []
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(1.0):
            if time.monotonic() - last[0] >= heartbeat:
                progress(f"{label}: still running ({time.monotonic() - started:.0f} s)")
                last[0] = time.monotonic()

    t = threading.Thread(target=beat, daemon=True)
    t.start()
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            log.write(line)
            lines.append(line.rstrip("\n"))
            del lines[:-40]
            if on_line:
                on_line(line.rstrip("\n"))
        rc = proc.wait()
    except BaseException:
        os.killpg(proc.pid, 15)
        proc.wait()
        raise
    finally:
        stop.set()
        t.join()
        log.flush()
    if rc != 0:
        tail = "\n    ".join(lines[-15:])
        nospace = any("No space left on device" in l for l in lines)
        raise VmError(f"{label} failed (exit {rc}){' - no space left on device' if nospace else ''}; "
                      f"last lines:\n    {tail}",
                      "see the full log: " + getattr(log, "name", "build.log"))


def debootstrap(spec: ImageSpec, target: Path, log, progress: Progress) -> None:
    exe = which_or_error("debootstrap", "debootstrap", "to build the guest's root filesystem")
    spec.debs_dir().mkdir(parents=True, exist_ok=True)
    cmd = [exe, "--variant=minbase", f"--include={','.join(sorted(set(spec.packages)))}",
           f"--cache-dir={spec.debs_dir().resolve()}", spec.release, str(target)]
    if spec.mirror:
        cmd.append(spec.mirror)  # else debootstrap's own default archive
    shown: set[str] = set()

    def on_line(line: str) -> None:
        if line.startswith(("W:", "E:")):
            progress(f"debootstrap {line}")
        elif DEBOOTSTRAP_SUMMARY.match(line):
            progress(f"debootstrap: {line[3:].rstrip('.')}")
        elif line.startswith("I: "):
            phase = DEBOOTSTRAP_PER_PACKAGE.get(line[3:].split(" ", 1)[0])
            if phase and phase not in shown:
                shown.add(phase)
                progress(f"debootstrap: {phase}")

    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive", LC_ALL="C.UTF-8")
    run_logged(cmd, log, progress, "debootstrap", on_line, env=env)


def busybox_tar() -> bytes:
    """A docker-importable root filesystem: busybox-static and a link per applet (image vbridge/busybox)."""
    bb = busybox_path()
    applets = subprocess.run([bb, "--list"], capture_output=True, text=True, check=True).stdout.split()
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tar:
        def add_dir(name: str) -> None:
            info = tarfile.TarInfo(name)
            info.type, info.mode = tarfile.DIRTYPE, 0o755
            tar.addfile(info)

        for d in ("bin", "etc", "tmp", "proc", "sys", "dev", "root"):
            add_dir(d)
        data = Path(bb).read_bytes()
        info = tarfile.TarInfo("bin/busybox")
        info.size, info.mode = len(data), 0o755
        tar.addfile(info, io.BytesIO(data))
        for applet in applets:
            if applet == "busybox":
                continue
            link = tarfile.TarInfo(f"bin/{applet}")
            link.type, link.linkname = tarfile.SYMTYPE, "busybox"
            tar.addfile(link)
        passwd = b"root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n"
        info = tarfile.TarInfo("etc/passwd")
        info.size = len(passwd)
        tar.addfile(info, io.BytesIO(passwd))
    return buf.getvalue()


def customize_rootfs(root: Path, kernel: str, progress: Progress) -> int:
    """Init, modules, config files; returns the number of module files copied."""
    def write(rel: str, data, mode: int = 0o644) -> None:
        p = root / rel.lstrip("/")
        p.parent.mkdir(parents=True, exist_ok=True)
        if p.is_symlink() or p.exists():
            p.unlink()
        p.write_bytes(data if isinstance(data, bytes) else data.encode())
        os.chmod(p, mode)

    write("/sbin/vbridge-init", (GUEST_DIR / "vbridge-init.sh").read_bytes(), 0o755)
    write("/etc/hostname", "vbridge\n")
    write("/etc/hosts", "127.0.0.1\tlocalhost\n127.0.1.1\tvbridge\n::1\tlocalhost ip6-localhost ip6-loopback\n")
    write("/etc/resolv.conf", "# the vbridge guest has no network of its own\n")
    write("/etc/fstab", "# mounted by /sbin/vbridge-init\n")
    write("/etc/machine-id", "")
    write("/usr/local/share/vbridge/busybox.tar", busybox_tar())
    (root / "usr/local/bin").mkdir(parents=True, exist_ok=True)

    # Modules: the listed ones and their dependencies, plus the kernel's module metadata, then depmod.
    warnings: list[str] = []
    files = module_files(kernel, ROOTFS_MODULES + INITRAMFS_MODULES + ["virtio_console"], warnings.append)
    for w in warnings:
        progress(f"note: {w}")
    src = Path(f"/lib/modules/{kernel}")
    dst = root / "lib/modules" / kernel  # lib -> usr/lib in Debian's merged /usr: resolved inside root
    for rel in files:
        (dst / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src / rel, dst / rel)
    for meta in ("modules.builtin", "modules.builtin.modinfo", "modules.order"):
        if (src / meta).exists():
            shutil.copy2(src / meta, dst / meta)
    subprocess.run(["depmod", "-b", str(root), kernel], check=True, capture_output=True)

    # Smaller disk: package lists, .debs, docs, man pages, locales.
    for rel in ("var/cache/apt/archives", "var/lib/apt/lists", "usr/share/doc", "usr/share/man",
                "usr/share/info", "usr/share/locale"):
        p = root / rel
        if p.is_dir():
            for child in p.iterdir():
                if child.is_dir() and not child.is_symlink():
                    shutil.rmtree(child, ignore_errors=True)
                elif child.name != "lock":
                    child.unlink(missing_ok=True)
    return len(files)


def make_ext4(tree: Path, out: Path, size: int, log, progress: Progress) -> None:
    exe = which_or_error("mke2fs", "e2fsprogs", "to turn the root filesystem into a disk image")
    run_logged([exe, "-q", "-F", "-t", "ext4", "-L", "vbridge-root", "-m", "0", "-E", "root_owner=0:0",
                "-d", str(tree), str(out), str(size // 1024) + "k"], log, progress, "mke2fs")


def write_agent(disk: Path, agent: Path, log, progress: Progress) -> None:
    """Puts the agent binary at /usr/local/bin/vbridge-guest in the ext4 image with debugfs (no mount)."""
    exe = which_or_error("debugfs", "e2fsprogs", "to write the guest agent into the disk image")
    with tempfile.NamedTemporaryFile("w", suffix=".debugfs", delete=False) as cmds:
        cmds.write("cd /usr/local/bin\n"
                   f"write {agent} vbridge-guest\n"
                   "sif vbridge-guest mode 0100755\n"
                   "sif vbridge-guest uid 0\n"
                   "sif vbridge-guest gid 0\n")
    try:
        run_logged([exe, "-w", "-f", cmds.name, str(disk)], log, progress, "debugfs (write agent)")
    finally:
        os.unlink(cmds.name)
    r = subprocess.run([exe, "-R", f"stat {AGENT_PATH_IN_GUEST}", str(disk)], capture_output=True, text=True)
    size = agent.stat().st_size
    if f"Size: {size}" not in r.stdout:
        raise VmError(f"writing the agent into {disk} failed (debugfs stat: {r.stdout.strip()[:200]!r})")


# ---------------------------------------------------------------------------------------------------------------
# build
# ---------------------------------------------------------------------------------------------------------------

def unmount_under(path: Path) -> None:
    """Lazily unmounts whatever an interrupted debootstrap left mounted below `path` (its proc, sys, dev)."""
    prefix = str(path.resolve()) + "/"
    try:
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return
    points = [l.split()[4].encode().decode("unicode_escape") for l in lines if len(l.split()) > 4]
    for point in sorted((p for p in points if p.startswith(prefix)), key=len, reverse=True):
        subprocess.run(["umount", "-l", point], capture_output=True)


def remove_tree(path: Path) -> None:
    if path.exists():
        unmount_under(path)
        shutil.rmtree(path, ignore_errors=True)


def _clean_stale_tmp(images: Path) -> None:
    for tmp in images.glob(".tmp-*"):
        try:
            pid = int(tmp.name.rsplit("-", 1)[1])
        except (IndexError, ValueError):
            continue
        if not os.path.exists(f"/proc/{pid}"):
            remove_tree(tmp)


def _sparse_copy(src: Path, dst: Path) -> None:
    subprocess.run(["cp", "--sparse=always", "--reflink=auto", str(src), str(dst)], check=True)


def allocated(path: Path) -> int:
    return path.stat().st_blocks * 512


def replace_dir(tmp: Path, final: Path) -> None:
    """Renames the finished `tmp` to `final`; an older `final` (a forced rebuild) is moved aside first."""
    if final.exists():
        old = final.with_name(f".tmp-old-{final.name}-{os.getpid()}")
        os.rename(final, old)
        os.rename(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, final)


def build_base(spec: ImageSpec, key: str, inputs: dict, progress: Progress, force: bool = False) -> Path:
    images = spec.images_dir()
    final = images / f"base-{key}"
    if (final / "manifest.json").is_file() and not force:
        return final
    check_free_space(images, BASE_BUILD_SPACE, f"building the guest base image base-{key}")
    kernel = inputs["kernel"]
    tmp = images / f".tmp-base-{key}-{os.getpid()}"
    remove_tree(tmp)
    tmp.mkdir(parents=True)
    timings: dict[str, float] = {}
    ok = False
    try:
        with open(tmp / "build.log", "w") as log:
            progress(f"building base image {key}: Debian {spec.release}, kernel {kernel} "
                     f"(log: {tmp / 'build.log'})")
            t = time.monotonic()
            debootstrap(spec, tmp / "rootfs", log, progress)
            timings["debootstrap_s"] = round(time.monotonic() - t, 1)
            progress(f"debootstrap done in {timings['debootstrap_s']} s")

            t = time.monotonic()
            n = customize_rootfs(tmp / "rootfs", kernel, progress)
            timings["customize_s"] = round(time.monotonic() - t, 1)
            progress(f"root filesystem customized: init, {n} module files ({timings['customize_s']} s)")

            t = time.monotonic()
            size = parse_size(spec.disk_size)
            make_ext4(tmp / "rootfs", tmp / "rootfs.ext4", size, log, progress)
            timings["mke2fs_s"] = round(time.monotonic() - t, 1)
            progress(f"root disk rootfs.ext4: {human(size)} ({human(allocated(tmp / 'rootfs.ext4'))} used), "
                     f"{timings['mke2fs_s']} s")
            remove_tree(tmp / "rootfs")

            t = time.monotonic()
            notes: list[str] = []
            count = build_initramfs(kernel, tmp / "initramfs.cpio.gz", notes.append)
            for note in notes:
                progress(f"note: {note}")
            shutil.copy2(f"/boot/vmlinuz-{kernel}", tmp / "vmlinuz")
            why_not = extract_vmlinux(kernel, tmp / "vmlinux")
            if why_not:
                progress(f"note: no uncompressed vmlinux for PVH boot ({why_not}); guests boot vmlinuz")
            timings["initramfs_s"] = round(time.monotonic() - t, 1)
            progress(f"initramfs: busybox + {count} modules, {human((tmp / 'initramfs.cpio.gz').stat().st_size)}")

        write_json_atomic(tmp / "manifest.json", {
            "kind": "base", "key": key, "inputs": inputs, "mirror": spec.mirror, "timings": timings,
            "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "rootfs_allocated": allocated(tmp / "rootfs.ext4"),
        })
        replace_dir(tmp, final)
        ok = True
        return final
    except OSError as e:
        if e.errno == 28:
            raise VmError(f"no space left on device while building {final} ({e})",
                          "free some space or set VBRIDGE_CACHE_DIR to a filesystem with room") from None
        raise
    finally:
        if not ok:
            remove_tree(tmp)


def build_image(spec: ImageSpec, progress: Optional[Progress] = None, force: bool = False) -> Path:
    """Builds (or reuses) the image for `spec`; returns its folder."""
    progress = progress or Progress("vbridge image")
    images = spec.images_dir()
    images.mkdir(parents=True, exist_ok=True)
    base_key, key, inputs, agent_sha = image_keys(spec)
    final = images / key
    with file_lock(images / f".lock-{base_key}", f"image base-{base_key}", progress=progress):
        _clean_stale_tmp(images)
        if (final / "manifest.json").is_file() and not force:
            progress(f"image {key} is cached: {final}")
            os.utime(final)
            return final
        base = build_base(spec, base_key, inputs, progress, force)
        progress(f"base image {base_key} ready; adding the guest agent" if spec.agent
                 else f"base image {base_key} ready; no guest agent given: image boots without it")

        base_alloc = allocated(base / "rootfs.ext4")
        check_free_space(images, base_alloc + 64 * MiB, f"the guest image {key}")
        tmp = images / f".tmp-{key}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        ok = False
        try:
            t = time.monotonic()
            for name in ("vmlinuz", "vmlinux", "initramfs.cpio.gz"):
                if (base / name).exists():
                    os.link(base / name, tmp / name)
            agent_info = None
            if spec.agent:
                agent = Path(spec.agent).resolve()
                static = is_static_elf(str(agent))
                if not static:
                    progress(f"warning: {agent} is dynamically linked; the guest has Debian {spec.release}'s libc "
                             "but not the agent's other libraries: build it statically (see tools/vm/README.md)")
                _sparse_copy(base / "rootfs.ext4", tmp / "rootfs.ext4")
                with open(tmp / "build.log", "w") as log:
                    write_agent(tmp / "rootfs.ext4", agent, log, progress)
                agent_info = {"path": str(agent), "sha256": agent_sha, "size": agent.stat().st_size,
                              "static": static}
            else:
                os.link(base / "rootfs.ext4", tmp / "rootfs.ext4")  # read-only use: guests boot it snapshot=on
            write_json_atomic(tmp / "manifest.json", {
                "kind": "image", "key": key, "base": base_key, "kernel": inputs["kernel"],
                "release": spec.release, "agent": agent_info,
                "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "agent_layer_s": round(time.monotonic() - t, 1),
            })
            replace_dir(tmp, final)
            ok = True
        except OSError as e:
            if e.errno == 28:
                raise VmError(f"no space left on device while building {final} ({e})",
                              "free some space or set VBRIDGE_CACHE_DIR to a filesystem with room") from None
            raise
        finally:
            if not ok:
                shutil.rmtree(tmp, ignore_errors=True)
        progress(f"image {key} ready: {final}")
    prune(spec.images_dir(), keep=4, progress=progress, protect={key})
    return final


def cached_image(spec: ImageSpec) -> Optional[Path]:
    _, key, _, _ = image_keys(spec)
    final = spec.images_dir() / key
    return final if (final / "manifest.json").is_file() else None


def list_images(images: Path) -> list[dict]:
    out = []
    if not images.is_dir():
        return out
    for d in sorted(images.iterdir()):
        m = read_json(d / "manifest.json") if d.is_dir() and not d.name.startswith(".") else None
        if m:
            disk = d / "rootfs.ext4"
            m["dir"] = str(d)
            m["mtime"] = d.stat().st_mtime
            m["allocated"] = allocated(disk) if disk.exists() else 0
            out.append(m)
    return out


def prune(images: Path, keep: int = 4, progress: Optional[Progress] = None, protect: Iterable[str] = ()) -> list[str]:
    """Keeps the `keep` most recently used images (and their bases); removes the rest and unused bases."""
    removed = []
    all_images = list_images(images)
    finals = sorted((m for m in all_images if m.get("kind") == "image"), key=lambda m: m["mtime"], reverse=True)
    kept = [m for i, m in enumerate(finals) if i < keep or m["key"] in protect]
    for m in finals:
        if m not in kept:
            shutil.rmtree(m["dir"], ignore_errors=True)
            removed.append(m["dir"])
    used_bases = {m["base"] for m in kept}
    bases = sorted((m for m in all_images if m.get("kind") == "base"), key=lambda m: m["mtime"], reverse=True)
    for i, m in enumerate(bases):
        if m["key"] not in used_bases and i > 0:
            shutil.rmtree(m["dir"], ignore_errors=True)
            removed.append(m["dir"])
    if progress:
        for r in removed:
            progress(f"pruned old image {r}")
    return removed


# ---------------------------------------------------------------------------------------------------------------
# command line
# ---------------------------------------------------------------------------------------------------------------

def add_spec_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--agent", help="the guest agent binary (statically linked) to put at " + AGENT_PATH_IN_GUEST)
    p.add_argument("--release", default=DEFAULT_RELEASE, help="Debian release for debootstrap (default %(default)s)")
    p.add_argument("--mirror", default=DEFAULT_MIRROR, help="Debian mirror (default %(default)s)")
    p.add_argument("--kernel", help="kernel version from /boot (default: newest with /lib/modules)")
    p.add_argument("--extra-package", action="append", default=[], metavar="PKG",
                   help="another Debian package for the root filesystem (repeatable)")
    p.add_argument("--disk-size", default=DEFAULT_DISK_SIZE, help="root disk size (default %(default)s)")
    p.add_argument("--cache-dir", help="cache folder (default ${XDG_CACHE_HOME:-~/.cache}/vbridge)")


def spec_from_args(args) -> ImageSpec:
    return ImageSpec(release=args.release, mirror=args.mirror, packages=DEFAULT_PACKAGES + args.extra_package,
                     kernel=args.kernel, agent=args.agent, disk_size=args.disk_size, cache_dir=args.cache_dir)


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="image.py", description="Build or reuse the vbridge guest image.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="build the image, or reuse the cached one; prints its folder")
    add_spec_args(b)
    b.add_argument("--force", action="store_true",
                   help="rebuild even if cached (the cached image is replaced only once the new one is complete)")
    b.add_argument("--json", action="store_true", help="print the manifest as JSON instead of the folder")
    pth = sub.add_parser("path", help="print the cached image's folder (exit 1 if not built)")
    add_spec_args(pth)
    ls = sub.add_parser("list", help="list cached images")
    ls.add_argument("--cache-dir")
    pr = sub.add_parser("prune", help="remove all but the most recently used images")
    pr.add_argument("--cache-dir")
    pr.add_argument("--keep", type=int, default=2)
    args = ap.parse_args(argv)

    def run() -> int:
        if args.cmd == "build":
            if os.geteuid() != 0:
                raise VmError("building the image needs root (debootstrap, device nodes, file ownership)")
            spec = spec_from_args(args)
            path = build_image(spec, force=args.force)
            if args.json:
                print(json.dumps(dict(read_json(path / "manifest.json") or {}, dir=str(path)), indent=2))
            else:
                print(path)
            return 0
        if args.cmd == "path":
            found = cached_image(spec_from_args(args))
            if not found:
                sys.stderr.write("vbridge image: not built yet (image.py build)\n")
                return 1
            print(found)
            return 0
        images = ((Path(args.cache_dir) if args.cache_dir else cache_root()) / "images")
        if args.cmd == "list":
            for m in list_images(images):
                agent = (m.get("agent") or {}).get("path", "-") if m["kind"] == "image" else ""
                print(f"{m['kind']:5} {m['key']}  {human(m['allocated']):>10}  {m.get('built_at', '')}  {agent}")
            return 0
        if args.cmd == "prune":
            for r in prune(images, keep=args.keep):
                print(f"removed {r}")
            return 0
        return 2

    return main_wrapper(run)


if __name__ == "__main__":
    sys.exit(main())
