"""Boots the real guest under QEMU (KVM if it works, else TCG) and checks the launcher end to end.

Runs only with VBRIDGE_VM_E2E=1 (as root, with qemu-system-x86, debootstrap and linux-image-amd64 installed):

    VBRIDGE_VM_E2E=1 python3 -m unittest discover -s tools/vm/tests -p 'test_vm_e2e.py' -v

The image is built (or reused) in the normal cache. With VBRIDGE_GUEST_AGENT=/path/to/static/vbridge-guest the
image carries the agent; with VBRIDGE_HOST_AGENT=/path/to/vbridge-host as well, Docker is driven from the host
across the VM boundary. One QEMU runs at a time.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import unittest
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import image  # noqa: E402
import launch  # noqa: E402
import vmcommon  # noqa: E402
from vmcommon import VmError  # noqa: E402

ENABLED = os.environ.get("VBRIDGE_VM_E2E") == "1"
AGENT = os.environ.get("VBRIDGE_GUEST_AGENT") or None
HOST_AGENT = os.environ.get("VBRIDGE_HOST_AGENT") or None
BOOT_TIMEOUT = float(os.environ.get("VBRIDGE_VM_TIMEOUT", "240"))


def skip_reason() -> str:
    if not ENABLED:
        return "set VBRIDGE_VM_E2E=1 to boot the real guest"
    if os.geteuid() != 0:
        return "needs root"
    for prog in ("qemu-system-x86_64", "debootstrap"):
        if not shutil.which(prog, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin"):
            return f"{prog} not installed"
    if not vmcommon.find_kernels():
        return "no installed kernel (linux-image-amd64)"
    return ""


def no_qemu_of(instance_dir: Path) -> bool:
    for pid in os.listdir("/proc"):
        if pid.isdigit() and launch.is_our_qemu(int(pid), instance_dir) and launch.pid_alive(int(pid)):
            return False
    return True


@unittest.skipIf(skip_reason(), skip_reason())
class BootAndStop(unittest.TestCase):
    @classmethod
    def setUpClass(cls) -> None:
        cls.runtime = Path(tempfile.mkdtemp(prefix="vbvm-", dir="/tmp"))
        cls.share = cls.runtime / "share"
        cls.share.mkdir()
        (cls.share / "from-host.txt").write_text("hello from the host\n")
        cls.host_proc = None
        cls.cfg = launch.LaunchConfig(name="e2e", runtime_dir=str(cls.runtime), timeout=BOOT_TIMEOUT,
                                      shares=[str(cls.share)], spec=image.ImageSpec(agent=AGENT))
        t = time.monotonic()
        cls.state = launch.start(cls.cfg, vmcommon.Progress("e2e"))
        cls.boot_s = time.monotonic() - t
        cls.inst = launch.Instance.named("e2e", str(cls.runtime))

    @classmethod
    def tearDownClass(cls) -> None:
        try:
            if cls.host_proc:
                cls.host_proc.terminate()
                cls.host_proc.wait(10)
            launch.stop("e2e", runtime_dir=str(cls.runtime), progress=vmcommon.Progress("e2e"))
            assert no_qemu_of(cls.inst.dir), "QEMU still running after stop"
            for leftover in (cls.inst.pidfile, cls.inst.qmp, cls.inst.default_agent_socket):
                assert not leftover.exists(), f"{leftover} left behind"
        finally:
            if os.environ.get("VBRIDGE_KEEP_WORKDIR") != "1":
                shutil.rmtree(cls.runtime, ignore_errors=True)

    def test_ready_state(self) -> None:
        st = launch.status("e2e", str(self.runtime))
        self.assertTrue(st["running"])
        self.assertTrue(st["ready"])
        self.assertIn(st["accel"], ("kvm", "tcg"))
        self.assertNotEqual(st["dockerd"], "failed")
        self.assertEqual(st["agent"], "running" if AGENT else "absent")
        self.assertTrue(Path(st["agent_socket"]).is_socket())
        log = Path(st["serial_log"]).read_text(errors="replace")
        self.assertIn("VBRIDGE_READY", log)
        self.assertIn("share vbshare0 mounted", log)
        sys.stderr.write(f"\n  boot to ready: {self.boot_s:.1f} s ({st['accel']})\n")

    def test_second_start_is_refused(self) -> None:
        with self.assertRaises(VmError) as ctx:
            launch.start(self.cfg, vmcommon.Progress(quiet=True))
        self.assertIn("already running", str(ctx.exception))

    @unittest.skipUnless(AGENT and HOST_AGENT, "needs VBRIDGE_GUEST_AGENT and VBRIDGE_HOST_AGENT")
    def test_docker_across_the_vm_boundary(self) -> None:
        cls = type(self)
        with open(self.runtime / "host.log", "wb") as log:
            cls.host_proc = subprocess.Popen(
                [HOST_AGENT, "-t", f"unix:{self.state['agent_socket']}", "-i", "e2e", "--runtime-dir",
                 str(self.runtime / "host"), "--no-docker-context"], stdout=log, stderr=log)
        sock = self.runtime / "host" / "docker.sock"
        env = dict(os.environ, DOCKER_HOST=f"unix://{sock}")
        deadline = time.monotonic() + 30
        while True:
            r = subprocess.run(["docker", "version", "--format", "{{.Server.KernelVersion}}"], env=env,
                               capture_output=True, text=True)
            if r.returncode == 0 or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        self.assertEqual(r.returncode, 0, r.stderr)
        tar = self.runtime / "busybox.tar"
        tar.write_bytes(image.busybox_tar())
        subprocess.run(["docker", "import", str(tar), "vbridge/busybox"], env=env, check=True, capture_output=True)
        r = subprocess.run(["docker", "run", "--rm", "-v", f"{self.share}:/data", "vbridge/busybox", "sh", "-c",
                            "cat /data/from-host.txt && echo written in the guest > /data/from-guest.txt"],
                           env=env, capture_output=True, text=True, timeout=120)
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertEqual(r.stdout, "hello from the host\n")
        self.assertEqual((self.share / "from-guest.txt").read_text(), "written in the guest\n")


@unittest.skipIf(skip_reason(), skip_reason())
class GuestThatNeverAnswers(unittest.TestCase):
    def test_deadline_is_a_clear_error_and_leaves_nothing_running(self) -> None:
        runtime = Path(tempfile.mkdtemp(prefix="vbvm-", dir="/tmp"))
        self.addCleanup(shutil.rmtree, runtime, True)
        cfg = launch.LaunchConfig(name="mute", runtime_dir=str(runtime), timeout=4,
                                  spec=image.ImageSpec(agent=AGENT))
        with self.assertRaises(VmError) as ctx:
            launch.start(cfg, vmcommon.Progress("e2e"))
        inst = launch.Instance.named("mute", str(runtime))
        self.assertIn("guest did not answer within 4 s", str(ctx.exception))
        self.assertIn(str(inst.serial_log), str(ctx.exception))
        self.assertTrue(no_qemu_of(inst.dir))
        self.assertFalse(inst.default_agent_socket.exists())
        self.assertFalse(inst.qmp.exists())
        self.assertFalse(inst.pidfile.exists())

    def test_socket_path_in_use(self) -> None:
        runtime = Path(tempfile.mkdtemp(prefix="vbvm-", dir="/tmp"))
        self.addCleanup(shutil.rmtree, runtime, True)
        busy = runtime / "busy.sock"
        srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        srv.bind(str(busy))
        srv.listen(1)
        self.addCleanup(srv.close)
        cfg = launch.LaunchConfig(name="busy", runtime_dir=str(runtime), agent_socket=str(busy),
                                  spec=image.ImageSpec(agent=AGENT))
        with self.assertRaises(VmError) as ctx:
            launch.start(cfg, vmcommon.Progress(quiet=True))
        self.assertIn("is in use", str(ctx.exception))


if __name__ == "__main__":
    unittest.main()
