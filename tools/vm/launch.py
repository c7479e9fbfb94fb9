#!/usr/bin/env python3
"""vbridge VM launcher: boots the guest image with QEMU and stops it again.

    launch.py start  [--name NAME] [--agent PATH | --image DIR] [--share HOST[:GUEST]]... [--timeout S] [--json]
    launch.py stop   [--name NAME] [--timeout S]
    launch.py status [--name NAME] [--json]
    launch.py probe-accel [--image DIR]

`start` builds or reuses the image (image.py), picks the accelerator (KVM when a short probe boot shows that it
really works, else TCG; the choice and its reason are logged), boots QEMU detached, prints the guest's progress
from its serial console and returns once the guest init reports VBRIDGE_READY (dockerd answers, agent started).
The instance lives in <runtime>/<name>/ (runtime: $VBRIDGE_RUNTIME_DIR, $XDG_RUNTIME_DIR/vbridge, /run/vbridge
for root, else /tmp/vbridge-<uid>/vbridge, as tools/vbridge uses for the host agent's sockets):
    agent.sock     QEMU's virtio-serial chardev (port "vbridge.0"), the host agent's transport: one connection at
                   a time
    qmp.sock       QMP monitor (stop uses system_powerdown)
    serial.log     the guest console (kernel, initramfs, vbridge-init, dockerd failures, the guest agent's log)
    qemu.log       QEMU's own stdout/stderr
    qemu.pid       QEMU's pid
    instance.json  how it was started and whether it is ready
The root disk is attached snapshot=on: the cached image is never written; guest writes go to a temporary file
that QEMU deletes (in $TMPDIR, default /var/tmp). `stop` powers the guest down over QMP, then SIGTERM, then
SIGKILL (by pid, after deadlines), and removes the sockets and the pidfile; serial.log and qemu.log stay.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shlex
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import image as image_mod  # noqa: E402
from vmcommon import (MiB, Progress, VmError, check_free_space, file_lock, main_wrapper,  # noqa: E402
                      read_json, runtime_root, which_or_error, write_json_atomic)

QEMU = "qemu-system-x86_64"
QEMU_PACKAGE = "qemu-system-x86"
SERIAL_PORT_NAME = "vbridge.0"
SHM_BYTES = 128 * MiB  # ivshmem wants a power of two; vbridge-host --shm-size-mib must match
DEFAULT_VSOCK_PORT = 1024
SUN_PATH_MAX = 107
PROBE_TIMEOUT = 20.0
SNAPSHOT_MIN_FREE = 512 * MiB
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,31}")

READY_RE = re.compile(r"VBRIDGE_READY dockerd=(\S+) agent=(\S+) uptime=(\S+)")
PANIC_RE = re.compile(r"Kernel panic - not syncing: (.*)")


# ---------------------------------------------------------------------------------------------------------------
# instance folder
# ---------------------------------------------------------------------------------------------------------------

@dataclass
class Instance:
    name: str
    dir: Path

    @classmethod
    def named(cls, name: str, runtime: Optional[str] = None) -> "Instance":
        if not NAME_RE.fullmatch(name):
            raise VmError(f"bad instance name {name!r}: use up to 32 letters, digits, '.', '_' or '-'")
        return cls(name, (Path(runtime) if runtime else runtime_root()) / name)

    @property
    def pidfile(self) -> Path:
        return self.dir / "qemu.pid"

    @property
    def qmp(self) -> Path:
        return self.dir / "qmp.sock"

    @property
    def default_agent_socket(self) -> Path:
        return self.dir / "agent.sock"

    @property
    def serial_log(self) -> Path:
        return self.dir / "serial.log"

    @property
    def qemu_log(self) -> Path:
        return self.dir / "qemu.log"

    @property
    def state_file(self) -> Path:
        return self.dir / "instance.json"

    @property
    def lock(self) -> Path:
        return self.dir / "lock"

    def state(self) -> dict:
        return read_json(self.state_file) or {}

    def pid(self) -> Optional[int]:
        try:
            return int(self.pidfile.read_text().strip())
        except (OSError, ValueError):
            return self.state().get("pid")

    def agent_socket(self) -> Path:
        return Path(self.state().get("agent_socket") or self.default_agent_socket)

    def running_pid(self) -> Optional[int]:
        """QEMU's pid if this instance's QEMU is alive (checked against /proc/<pid>/cmdline), else None."""
        pid = self.pid()
        if pid and pid_alive(pid) and is_our_qemu(pid, self.dir):
            return pid
        return None


def pid_alive(pid: int) -> bool:
    try:
        if os.waitpid(pid, os.WNOHANG)[0] == pid:  # our own child that has exited: reaped now
            return False
    except ChildProcessError:
        pass
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
        return state not in ("Z", "X")
    except (OSError, IndexError):
        return False


def is_our_qemu(pid: int, instance_dir: Path) -> bool:
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return bool(cmdline) and b"qemu-system" in cmdline[0] and any(str(instance_dir).encode() in a for a in cmdline)


def socket_in_use(path: Path) -> bool:
    """Someone listens on it. A listener with a full backlog (EAGAIN, timeout) counts as in use."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(1.0)
    try:
        s.connect(str(path))
        return True
    except (ConnectionRefusedError, FileNotFoundError, NotADirectoryError):
        return False
    except OSError:
        return True
    finally:
        s.close()


def claim_socket_path(path: Path, what: str, progress: Progress) -> None:
    """A path QEMU will listen on: short enough, parent exists, not a live socket or another kind of file."""
    if len(str(path)) > SUN_PATH_MAX:
        raise VmError(f"{what} path {path} is {len(str(path))} bytes; unix socket paths are limited to "
                      f"{SUN_PATH_MAX}", "choose a shorter path (or set VBRIDGE_RUNTIME_DIR)")
    if not path.parent.is_dir():
        raise VmError(f"{what} path {path}: folder {path.parent} does not exist")
    try:
        st = path.lstat()
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise VmError(f"{what} path {path} already exists and is not a socket; not replacing it")
    if socket_in_use(path):
        raise VmError(f"{what} path {path} is in use: a process is listening on it",
                      "stop that process (another vbridge VM? `launch.py status`) or choose another path")
    progress(f"removing stale socket {path}")
    path.unlink()


# ---------------------------------------------------------------------------------------------------------------
# accelerator
# ---------------------------------------------------------------------------------------------------------------

def host_boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def kernel_file(image_dir: Path) -> Path:
    """The uncompressed PVH-bootable vmlinux when the image has one (faster), else vmlinuz."""
    return image_dir / "vmlinux" if (image_dir / "vmlinux").is_file() else image_dir / "vmlinuz"


def probe_accel(qemu: str, image_dir: Path, progress: Progress, runtime: Optional[Path] = None,
                use_cache: bool = True) -> tuple[str, str]:
    """('kvm' | 'tcg', reason). KVM only when /dev/kvm opens *and* a probe boot of the image's kernel and
    initramfs reaches the initramfs within PROBE_TIMEOUT. The result is remembered per host boot, QEMU binary
    and kernel in <runtime>/accel-probe.json."""
    if not os.path.exists("/dev/kvm"):
        return "tcg", "no /dev/kvm"
    try:
        os.close(os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC))
    except OSError as e:
        return "tcg", f"/dev/kvm does not open: {e.strerror}"
    qst = os.stat(qemu)
    key = {"boot_id": host_boot_id(), "qemu": [qemu, qst.st_size, int(qst.st_mtime)],
           "kernel": image_mod.sha256_file(image_dir / "vmlinuz")}
    cache = (runtime or runtime_root()) / "accel-probe.json"
    cached = read_json(cache) if use_cache else None
    if cached and cached.get("key") == key:
        return cached["accel"], cached["reason"] + " (probed earlier this host boot)"

    progress("probing KVM with a short boot of the guest kernel")
    cmd = [qemu, "-accel", "kvm", "-cpu", "host", "-smp", "1", "-m", "256", "-nodefaults", "-no-user-config",
           "-display", "none", "-nic", "none", "-serial", "stdio", "-no-reboot",
           "-kernel", str(kernel_file(image_dir)), "-initrd", str(image_dir / "initramfs.cpio.gz"),
           "-append", "console=ttyS0 panic=-1 rdinit=/init quiet vbridge.probe=1"]
    started = time.monotonic()
    # A failing KVM makes QEMU abort(): no core file for that.
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True,
                            preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_CORE, (0, 0)))
    try:
        out, err = proc.communicate(timeout=PROBE_TIMEOUT)
        took = time.monotonic() - started
        if proc.returncode == 0 and b"VBRIDGE_PROBE_OK" in out:
            accel, reason = "kvm", f"KVM probe boot reached the initramfs in {took:.1f} s"
        else:
            lines = [l for l in (err + out).decode(errors="replace").splitlines() if l.strip()]
            detail = next((l for l in lines if "kvm" in l.lower() or "error" in l.lower()), lines[-1] if lines
                          else "no output")
            accel, reason = "tcg", f"KVM probe boot failed (exit {proc.returncode}): {detail.strip()[:200]}"
    except subprocess.TimeoutExpired:
        os.kill(proc.pid, signal.SIGKILL)
        proc.communicate()
        accel, reason = "tcg", f"KVM probe boot did not reach the initramfs within {PROBE_TIMEOUT:.0f} s"
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(cache, {"key": key, "accel": accel, "reason": reason})
    except OSError:
        pass
    return accel, reason


def vhost_vsock_usable() -> bool:
    try:
        os.close(os.open("/dev/vhost-vsock", os.O_RDWR | os.O_CLOEXEC))
        return True
    except OSError:
        return False


# ---------------------------------------------------------------------------------------------------------------
# QEMU command line
# ---------------------------------------------------------------------------------------------------------------

@dataclass
class Share:
    host: str
    guest: str
    tag: str

    @classmethod
    def parse(cls, text: str, index: int) -> "Share":
        host, _, guest = text.partition(":")
        host = os.path.abspath(host)
        guest = guest or host
        if not os.path.isdir(host):
            raise VmError(f"--share {text}: {host} is not a folder")
        if not guest.startswith("/") or any(c in guest for c in " ,:\t\n"):
            raise VmError(f"--share {text}: the guest path must be absolute, without spaces, ',' or ':'")
        if any(c in host for c in ","):
            raise VmError(f"--share {text}: QEMU cannot take a host path with ','")
        return cls(host, guest, f"vbshare{index}")


@dataclass
class LaunchConfig:
    name: str = "default"
    image: Optional[str] = None  # image folder; None = build/reuse from `spec`
    spec: image_mod.ImageSpec = field(default_factory=image_mod.ImageSpec)
    memory_mib: int = 2048
    cpus: int = 1
    accel: str = "auto"  # auto | kvm | tcg
    cpu: Optional[str] = None  # default: host (kvm), max (tcg)
    channel: str = "serial"  # serial | vsock | auto (vsock and auto open /dev/vhost-vsock: opt-in only)
    vsock_cid: int = 3
    vsock_port: int = DEFAULT_VSOCK_PORT
    shares: list[str] = field(default_factory=list)
    agent_socket: Optional[str] = None
    storage_driver: str = "overlay2"
    kernel_args: list[str] = field(default_factory=list)
    agent_args: list[str] = field(default_factory=list)
    shm_file: Optional[str] = None   # a tmpfs file shared with the host agent, as an ivshmem device
    timeout: float = 180.0
    runtime_dir: Optional[str] = None
    qemu: Optional[str] = None
    quiet_kernel: bool = True
    keep_on_failure: bool = False


def qemu_command(qemu: str, inst: Instance, image_dir: Path, cfg: LaunchConfig, accel: str, channel: str,
                 agent_socket: Path, shares: list[Share]) -> tuple[list[str], str]:
    """(argv, kernel command line)."""
    cpu = cfg.cpu or ("host" if accel == "kvm" else "max")
    accel_arg = "kvm" if accel == "kvm" else "tcg,thread=multi"
    listen = f"vsock:{cfg.vsock_port}" if channel == "vsock" else f"serial:{SERIAL_PORT_NAME}"
    # apparmor=0: Debian's kernel enables AppArmor, and dockerd then wants apparmor_parser and a profile for
    # every container; the guest is a single-purpose VM without AppArmor's userspace.
    append = ["console=ttyS0", "panic=-1", "rdinit=/init", "root=/dev/vda", "apparmor=0"]
    if cfg.quiet_kernel:
        append.append("quiet")
    append += [f"vbridge.listen={listen}", f"vbridge.storage={cfg.storage_driver}",
               f"vbridge.docker_timeout={int(max(cfg.timeout - 10, 30))}"]
    if shares:
        append.append("vbridge.share=" + ",".join(f"{s.tag}:{s.guest}" for s in shares))
    agent_args = [*cfg.agent_args, *(["--shm-file=pci"] if cfg.shm_file else [])]
    if agent_args:
        if any("," in a or " " in a for a in agent_args):
            raise VmError("--agent-arg values cannot contain ',' or spaces (they travel on the kernel command line)")
        append.append("vbridge.agent_args=" + ",".join(agent_args))
    append += cfg.kernel_args
    cmdline = " ".join(append)
    argv = [qemu, "-name", f"vbridge-{inst.name}", "-accel", accel_arg, "-cpu", cpu,
            "-smp", str(cfg.cpus), "-m", str(cfg.memory_mib),
            "-nodefaults", "-no-user-config", "-display", "none", "-nic", "none",
            "-serial", f"file:{inst.serial_log}",
            "-kernel", str(kernel_file(image_dir)), "-initrd", str(image_dir / "initramfs.cpio.gz"),
            "-append", cmdline, "-no-reboot",
            "-drive", f"file={image_dir / 'rootfs.ext4'},if=virtio,format=raw,cache=unsafe,snapshot=on",
            "-device", "virtio-serial-pci",
            "-chardev", f"socket,path={agent_socket},server=on,wait=off,id=vbridge0",
            "-device", f"virtserialport,chardev=vbridge0,name={SERIAL_PORT_NAME}",
            "-qmp", f"unix:{inst.qmp},server=on,wait=off",
            "-pidfile", str(inst.pidfile)]
    if channel == "vsock":
        argv += ["-device", f"vhost-vsock-pci,guest-cid={cfg.vsock_cid}"]
    if cfg.shm_file:
        # The host agent's --shm-file, as PCI BAR 2 of an ivshmem device; the guest agent maps that BAR.
        argv += ["-object", f"memory-backend-file,id=vbshm,mem-path={cfg.shm_file},size={SHM_BYTES},share=on",
                 "-device", "ivshmem-plain,memdev=vbshm"]
    for s in shares:
        argv += ["-virtfs", f"local,path={s.host},mount_tag={s.tag},security_model=none,multidevs=remap,id={s.tag}"]
    return argv, cmdline


# ---------------------------------------------------------------------------------------------------------------
# start
# ---------------------------------------------------------------------------------------------------------------

class SerialFollower:
    """Reads complete new lines from the serial log as the guest writes them."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = 0
        self.partial = b""
        self.tail: list[str] = []

    def lines(self) -> list[str]:
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                data = f.read()
        except FileNotFoundError:
            return []
        self.offset += len(data)
        data = self.partial + data
        *complete, self.partial = data.split(b"\n")
        out = [l.decode(errors="replace").rstrip("\r") for l in complete]
        self.tail = (self.tail + out)[-30:]
        return out

    def last_lines(self, n: int = 15) -> str:
        lines = self.tail[-n:] + ([self.partial.decode(errors="replace")] if self.partial else [])
        return "\n".join("    " + l for l in lines) or "    (the guest printed nothing)"


def file_tail(path: Path, n: int = 10) -> str:
    try:
        lines = path.read_text(errors="replace").splitlines()[-n:]
    except OSError:
        return "    (none)"
    return "\n".join("    " + l for l in lines) or "    (empty)"


def start(cfg: LaunchConfig, progress: Optional[Progress] = None) -> dict:
    """Boots the VM and waits until it is ready; returns the instance state (see instance.json)."""
    progress = progress or Progress("vbridge vm")
    inst = Instance.named(cfg.name, cfg.runtime_dir)
    qemu = cfg.qemu or which_or_error(QEMU, QEMU_PACKAGE, "to boot the vbridge guest")
    if cfg.qemu and not (os.path.isfile(cfg.qemu) and os.access(cfg.qemu, os.X_OK)):
        raise VmError(f"QEMU binary {cfg.qemu} not found or not executable",
                      f"install Debian's {QEMU_PACKAGE} package: apt-get install --no-install-recommends "
                      f"{QEMU_PACKAGE}")
    created = not inst.dir.exists()
    inst.dir.mkdir(parents=True, exist_ok=True)
    try:
        return _start_locked(cfg, inst, qemu, progress)
    except BaseException:
        if created and not inst.state_file.exists():  # failed before QEMU ran: leave nothing behind
            shutil.rmtree(inst.dir, ignore_errors=True)
        raise


def _start_locked(cfg: LaunchConfig, inst: Instance, qemu: str, progress: Progress) -> dict:
    with file_lock(inst.lock, f"VM instance {cfg.name!r}", wait=False):
        pid = inst.running_pid()
        if pid:
            raise VmError(f"VM instance {cfg.name!r} is already running (QEMU pid {pid}, {inst.dir})",
                          f"stop it first: launch.py stop --name {cfg.name}")
        cleanup_files(inst, progress)

        agent_socket = Path(os.path.abspath(cfg.agent_socket)) if cfg.agent_socket else inst.default_agent_socket
        claim_socket_path(agent_socket, "agent socket", progress)
        claim_socket_path(inst.qmp, "QMP socket", progress)
        shares = [Share.parse(text, i) for i, text in enumerate(cfg.shares)]

        if cfg.image:
            image_dir = Path(cfg.image)
            for name in ("vmlinuz", "initramfs.cpio.gz", "rootfs.ext4"):
                if not (image_dir / name).is_file():
                    raise VmError(f"{image_dir} is not a vbridge image: {name} is missing", "build one: image.py build")
        else:
            image_dir = image_mod.build_image(cfg.spec, progress)
        manifest = read_json(image_dir / "manifest.json") or {}
        os.utime(image_dir)  # most recently used: kept by prune

        tmpdir = Path(os.environ.get("TMPDIR") or "/var/tmp")
        check_free_space(tmpdir, SNAPSHOT_MIN_FREE, "the guest's disk writes (QEMU snapshot file)")

        if cfg.accel == "auto":
            accel, reason = probe_accel(qemu, image_dir, progress,
                                        Path(cfg.runtime_dir) if cfg.runtime_dir else None)
        elif cfg.accel in ("kvm", "tcg"):
            accel, reason = cfg.accel, "requested with --accel"
        else:
            raise VmError(f"--accel {cfg.accel}: use auto, kvm or tcg")
        progress(f"accelerator: {accel.upper()} ({reason})")

        if cfg.channel == "auto":
            channel = "vsock" if vhost_vsock_usable() else "serial"
            why = "/dev/vhost-vsock is usable" if channel == "vsock" else "no usable /dev/vhost-vsock"
        elif cfg.channel in ("serial", "vsock"):
            channel, why = cfg.channel, "requested with --channel"
            if channel == "vsock" and not vhost_vsock_usable():
                raise VmError("--channel vsock needs /dev/vhost-vsock (modprobe vhost_vsock)")
        else:
            raise VmError(f"--channel {cfg.channel}: use auto, serial or vsock")
        progress(f"channel: {channel} ({why})" + (f"; agent socket {agent_socket}" if channel == "serial" else
                                                  f"; guest CID {cfg.vsock_cid} port {cfg.vsock_port}"))

        argv, cmdline = qemu_command(qemu, inst, image_dir, cfg, accel, channel, agent_socket, shares)
        if inst.serial_log.exists():
            os.replace(inst.serial_log, inst.dir / "serial.log.1")
        inst.serial_log.touch()
        state = {
            "name": cfg.name, "dir": str(inst.dir), "image": str(image_dir), "image_key": manifest.get("key"),
            "agent_in_image": bool(manifest.get("agent")), "accel": accel, "accel_reason": reason,
            "channel": channel, "agent_socket": str(agent_socket) if channel == "serial" else None,
            "vsock": {"cid": cfg.vsock_cid, "port": cfg.vsock_port} if channel == "vsock" else None,
            "qmp_socket": str(inst.qmp), "serial_log": str(inst.serial_log), "qemu_log": str(inst.qemu_log),
            "shares": [asdict(s) for s in shares], "memory_mib": cfg.memory_mib, "cpus": cfg.cpus,
            "kernel_cmdline": cmdline, "argv": argv, "ready": False,
        }
        with open(inst.qemu_log, "wb") as qlog:
            qlog.write(("$ " + " ".join(shlex.quote(a) for a in argv) + "\n").encode())
            qlog.flush()
            started = time.monotonic()
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=qlog, stderr=qlog,
                                    start_new_session=True, close_fds=True, cwd=str(inst.dir))
        state.update(pid=proc.pid, started_at=time.time())
        write_json_atomic(inst.state_file, state)
        progress(f"QEMU started (pid {proc.pid}, {accel}, {cfg.cpus} vCPU, {cfg.memory_mib} MiB); "
                 f"console: {inst.serial_log}")

        try:
            result = wait_ready(inst, proc, started, cfg.timeout, progress)
        except BaseException:
            if not cfg.keep_on_failure:
                progress("stopping the failed guest")
                kill_qemu(inst, proc.pid, progress)
                cleanup_files(inst, progress, agent_socket)
            if proc.poll() is None:
                proc.returncode = 0  # left running on purpose (--keep-on-failure)
            raise
        # From here on the pidfile tracks QEMU (pid_alive() reaps it if it is our child); the Popen object
        # must not warn that it was dropped while its process runs.
        proc.returncode = 0
        state.update(result, ready=True, boot_s=round(time.monotonic() - started, 1))
        write_json_atomic(inst.state_file, state)
        progress(f"guest ready in {state['boot_s']} s: dockerd {result['dockerd']}, agent {result['agent']}")
        return state


def wait_ready(inst: Instance, proc: subprocess.Popen, started: float, timeout: float, progress: Progress) -> dict:
    follower = SerialFollower(inst.serial_log)
    deadline = started + timeout
    last_beat = time.monotonic()
    saw_output = False
    while True:
        for line in follower.lines():
            if not saw_output and line.strip():
                saw_output = True
                progress("guest console: kernel booting")
            m = READY_RE.search(line)
            if m:
                return {"dockerd": m.group(1), "agent": m.group(2), "guest_uptime_s": float(m.group(3))}
            if "VBRIDGE_FAILED" in line:
                raise VmError(f"the guest failed to start: {line.split('VBRIDGE_FAILED', 1)[1].strip()}\n"
                              f"  last console lines ({inst.serial_log}):\n{follower.last_lines()}")
            pm = PANIC_RE.search(line)
            if pm:
                raise VmError(f"the guest kernel panicked: {pm.group(1)}\n"
                              f"  last console lines ({inst.serial_log}):\n{follower.last_lines()}")
            if line.startswith(("vbridge-initramfs:", "vbridge-init:")) and not line.startswith("vbridge-init:   "):
                progress(f"guest: {line.split(':', 1)[1].strip()}")
                last_beat = time.monotonic()
        rc = proc.poll()
        if rc is not None:
            raise VmError(f"QEMU exited (status {rc}) before the guest was ready\n"
                          f"  QEMU's output ({inst.qemu_log}):\n{file_tail(inst.qemu_log)}\n"
                          f"  last console lines ({inst.serial_log}):\n{follower.last_lines()}")
        now = time.monotonic()
        if now >= deadline:
            raise VmError(f"guest did not answer within {timeout:.0f} s; see {inst.serial_log}\n"
                          f"  last console lines:\n{follower.last_lines()}",
                          "a slow machine under TCG may need a longer --timeout")
        if now - last_beat >= 15:
            progress(f"still waiting for the guest ({now - started:.0f} s of {timeout:.0f} s)")
            last_beat = now
        time.sleep(0.1)


# ---------------------------------------------------------------------------------------------------------------
# stop
# ---------------------------------------------------------------------------------------------------------------

def qmp_command(path: Path, command: str, timeout: float = 3.0) -> dict:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        s.connect(str(path))
        f = s.makefile("rwb")
        json.loads(f.readline())  # greeting
        for cmd in ("qmp_capabilities", command):
            f.write(json.dumps({"execute": cmd}).encode() + b"\n")
            f.flush()
            while True:
                reply = json.loads(f.readline())
                if "return" in reply or "error" in reply:
                    break  # skip asynchronous events
            if "error" in reply:
                raise OSError(f"QMP {cmd}: {reply['error'].get('desc')}")
        return reply
    finally:
        s.close()


def wait_exit(pid: int, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if not pid_alive(pid):
            return True
        time.sleep(0.1)
    return not pid_alive(pid)


def kill_qemu(inst: Instance, pid: int, progress: Progress, term_wait: float = 5.0) -> None:
    if not pid_alive(pid):
        return
    if not is_our_qemu(pid, inst.dir):
        progress(f"pid {pid} is not this instance's QEMU; not signalling it")
        return
    os.kill(pid, signal.SIGTERM)
    if wait_exit(pid, term_wait):
        return
    progress(f"QEMU (pid {pid}) ignored SIGTERM for {term_wait:.0f} s; sending SIGKILL")
    os.kill(pid, signal.SIGKILL)
    wait_exit(pid, 5.0)


def cleanup_files(inst: Instance, progress: Progress, agent_socket: Optional[Path] = None) -> None:
    """Removes the pidfile and the sockets of a QEMU that is gone (never a live socket)."""
    paths = [inst.pidfile, inst.qmp, inst.default_agent_socket]
    st = inst.state()
    if st.get("agent_socket"):
        paths.append(Path(st["agent_socket"]))
    if agent_socket:
        paths.append(agent_socket)
    for p in dict.fromkeys(paths):
        try:
            if p.is_socket() and socket_in_use(p) and p != inst.pidfile:
                continue  # someone else's now
            p.unlink()
        except FileNotFoundError:
            pass
        except OSError as e:
            progress(f"warning: could not remove {p}: {e.strerror}")


def stop(name: str = "default", timeout: float = 30.0, runtime_dir: Optional[str] = None,
         progress: Optional[Progress] = None) -> dict:
    """Powers the guest down (QMP system_powerdown), then SIGTERM, then SIGKILL; removes sockets and pidfile."""
    progress = progress or Progress("vbridge vm")
    inst = Instance.named(name, runtime_dir)
    if not inst.dir.is_dir():
        return {"name": name, "was_running": False}
    with file_lock(inst.lock, f"VM instance {name!r}"):
        pid = inst.running_pid()
        how = "not running"
        if pid:
            started = time.monotonic()
            try:
                qmp_command(inst.qmp, "system_powerdown")
                progress(f"asked the guest to power down (QEMU pid {pid})")
                if wait_exit(pid, timeout):
                    how = "powered down"
            except (OSError, ValueError) as e:
                progress(f"QMP system_powerdown failed ({e}); terminating QEMU")
            if how != "powered down":
                if pid_alive(pid):
                    progress(f"guest still running after {time.monotonic() - started:.0f} s; sending SIGTERM")
                kill_qemu(inst, pid, progress)
                how = "killed" if not pid_alive(pid) else "still alive"
            if how == "still alive":
                raise VmError(f"QEMU (pid {pid}) survived SIGKILL")
            progress(f"stopped ({how}) in {time.monotonic() - started:.1f} s")
        cleanup_files(inst, progress)
        st = inst.state()
        if st:
            st.update(ready=False, stopped_at=time.time(), stop=how)
            write_json_atomic(inst.state_file, st)
        return {"name": name, "was_running": bool(pid), "stop": how}


def status(name: str = "default", runtime_dir: Optional[str] = None) -> dict:
    inst = Instance.named(name, runtime_dir)
    st = inst.state()
    pid = inst.running_pid()
    st.update(name=name, dir=str(inst.dir), running=bool(pid))
    if not pid:
        st["ready"] = False
    return st


# ---------------------------------------------------------------------------------------------------------------
# command line
# ---------------------------------------------------------------------------------------------------------------

def shell_lines(state: dict) -> str:
    keys = {"NAME": "name", "DIR": "dir", "PID": "pid", "ACCEL": "accel", "CHANNEL": "channel",
            "AGENT_SOCKET": "agent_socket", "SERIAL_LOG": "serial_log", "QMP_SOCKET": "qmp_socket",
            "BOOT_S": "boot_s", "DOCKERD": "dockerd", "AGENT": "agent"}
    return "".join(f"VBRIDGE_VM_{k}={shlex.quote(str(state.get(v) if state.get(v) is not None else ''))}\n"
                   for k, v in keys.items())


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="launch.py", description="Boot and stop the vbridge guest VM with QEMU.")
    ap.add_argument("--runtime-dir", help="folder of instance folders (default: see --help of start)")
    sub = ap.add_subparsers(dest="cmd", required=True)

    s = sub.add_parser("start", help="boot the guest and wait until dockerd answers")
    s.add_argument("--name", default="default", help="instance name (default %(default)s)")
    s.add_argument("--image", help="a built image folder (default: build or reuse one with image.py's options)")
    image_mod.add_spec_args(s)
    s.add_argument("--memory", type=int, default=2048, help="guest memory in MiB (default %(default)s)")
    s.add_argument("--cpus", type=int, default=1, help="vCPUs (default %(default)s)")
    s.add_argument("--accel", default="auto", choices=["auto", "kvm", "tcg"])
    s.add_argument("--cpu", help="QEMU -cpu model (default: host with KVM, max with TCG)")
    s.add_argument("--channel", default="serial", choices=["serial", "vsock", "auto"],
                   help="agent transport (default serial: virtio-serial behind a unix socket); vsock needs "
                        "/dev/vhost-vsock; auto opens /dev/vhost-vsock to decide (both opt-in)")
    s.add_argument("--vsock-cid", type=int, default=3)
    s.add_argument("--vsock-port", type=int, default=DEFAULT_VSOCK_PORT)
    s.add_argument("--share", action="append", default=[], metavar="HOST[:GUEST]",
                   help="share a host folder over 9p, mounted at GUEST (default: the same path) (repeatable)")
    s.add_argument("--agent-socket", help="unix socket path of the virtio-serial channel (default <dir>/agent.sock)")
    s.add_argument("--storage-driver", default="overlay2", choices=["overlay2", "vfs"])
    s.add_argument("--agent-arg", action="append", default=[], metavar="ARG",
                   help="extra argument for the guest agent, e.g. --agent-arg=--log-level=debug (repeatable)")
    s.add_argument("--shm-file", help="a tmpfs file (vbridge-host --shm-file) the guest agent maps through an "
                   "ivshmem device, for stream bytes passed by reference")
    s.add_argument("--kernel-arg", action="append", default=[], metavar="ARG", help="extra kernel argument")
    s.add_argument("--timeout", type=float, default=180.0, help="seconds to wait for the guest (default %(default)s)")
    s.add_argument("--qemu", help=f"QEMU binary (default {QEMU} on PATH)")
    s.add_argument("--verbose-kernel", action="store_true", help="leave out 'quiet' from the kernel command line")
    s.add_argument("--keep-on-failure", action="store_true", help="leave a guest that did not become ready running")
    s.add_argument("--foreground", action="store_true", help="stay attached; Ctrl-C (SIGINT/SIGTERM) stops the VM")
    s.add_argument("--json", action="store_true", help="print the instance state as JSON (default: shell lines)")

    t = sub.add_parser("stop", help="power the guest down and remove its sockets")
    t.add_argument("--name", default="default")
    t.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for the power-down before SIGTERM")

    st = sub.add_parser("status", help="is the instance running and ready")
    st.add_argument("--name", default="default")
    st.add_argument("--json", action="store_true")

    pa = sub.add_parser("probe-accel", help="tell whether KVM really works here (boots the image's kernel)")
    pa.add_argument("--image", help="image folder (default: the cached image without agent)")
    pa.add_argument("--no-cache", action="store_true", help="probe again even if probed this host boot")
    args = ap.parse_args(argv)

    def run() -> int:
        progress = Progress("vbridge vm")
        if args.cmd == "start":
            image_dir = args.image
            if os.geteuid() != 0 and not image_dir:
                found = image_mod.cached_image(image_mod.spec_from_args(args))
                if not found:
                    raise VmError("building the image needs root", "build it as root (image.py build with the same "
                                  "options), or pass --image DIR of a built image")
                image_dir = str(found)
            cfg = LaunchConfig(
                name=args.name, image=image_dir, spec=image_mod.spec_from_args(args), memory_mib=args.memory,
                cpus=args.cpus, accel=args.accel, cpu=args.cpu, channel=args.channel, vsock_cid=args.vsock_cid,
                vsock_port=args.vsock_port, shares=args.share, agent_socket=args.agent_socket,
                storage_driver=args.storage_driver, kernel_args=args.kernel_arg, agent_args=args.agent_arg,
                shm_file=args.shm_file,
                timeout=args.timeout, runtime_dir=args.runtime_dir, qemu=args.qemu,
                quiet_kernel=not args.verbose_kernel, keep_on_failure=args.keep_on_failure)
            state = start(cfg, progress)
            sys.stdout.write(json.dumps(state, indent=2) + "\n" if args.json else shell_lines(state))
            sys.stdout.flush()
            if args.foreground:
                return foreground(args.name, args.runtime_dir, state["pid"], progress)
            return 0
        if args.cmd == "stop":
            result = stop(args.name, args.timeout, args.runtime_dir, progress)
            if not result["was_running"]:
                progress(f"instance {args.name!r} was not running")
            return 0
        if args.cmd == "status":
            state = status(args.name, args.runtime_dir)
            if args.json:
                print(json.dumps(state, indent=2))
            else:
                word = "ready" if state.get("ready") else ("running" if state["running"] else "stopped")
                detail = (f" (pid {state.get('pid')}, {state.get('accel')}, agent socket {state.get('agent_socket')})"
                          if state["running"] else "")
                print(f"{args.name}: {word}{detail}")
            return 0 if state["running"] else 3
        if args.cmd == "probe-accel":
            qemu = which_or_error(QEMU, QEMU_PACKAGE, "to boot the vbridge guest")
            image_dir = Path(args.image) if args.image else None
            if not image_dir:  # any cached image will do: only its kernel and initramfs are booted
                images = [m for m in image_mod.list_images(image_mod.ImageSpec().images_dir()) if m["kind"] == "image"]
                image_dir = Path(max(images, key=lambda m: m["mtime"])["dir"]) if images else None
            if not image_dir:
                raise VmError("no image to probe with", "build one: image.py build, or pass --image")
            accel, reason = probe_accel(qemu, image_dir, progress,
                                        Path(args.runtime_dir) if args.runtime_dir else None,
                                        use_cache=not args.no_cache)
            print(f"{accel}\t{reason}")
            return 0
        return 2

    return main_wrapper(run)


def foreground(name: str, runtime_dir: Optional[str], pid: int, progress: Progress) -> int:
    stopping = {"flag": False}

    def on_signal(signum, _frame) -> None:
        stopping["flag"] = True

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    progress("running in the foreground; Ctrl-C stops the VM")
    while not stopping["flag"] and pid_alive(pid):
        time.sleep(0.2)
    if stopping["flag"]:
        stop(name, runtime_dir=runtime_dir, progress=progress)
    else:
        progress("QEMU exited")
        cleanup_files(Instance.named(name, runtime_dir), progress)
    return 0


if __name__ == "__main__":
    sys.exit(main())
