"""Boots the real guest under QEMU (KVM if it works, else TCG) and checks the launcher end to end.

Runs only with VBRIDGE_VM_E2E=1 (as root, with qemu-system-x86, debootstrap and linux-image-amd64 installed):

    VBRIDGE_VM_E2E=1 python3 -m unittest discover -s tools/vm/tests -p 'test_vm_e2e.py' -v

The image is built (or reused) in the normal cache. With VBRIDGE_GUEST_AGENT=/path/to/static/vbridge-guest the
image carries the agent; with VBRIDGE_HOST_AGENT=/path/to/vbridge-host as well, Docker is driven from the host
across the VM boundary. One QEMU runs at a time.
"""

from __future__ import annotations

import os
import json
import shutil
import socket
import stat
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
        # The guest agent replays host changes of the share on its 9p mount (same path in the guest).
        cls.cfg = launch.LaunchConfig(name="e2e", runtime_dir=str(cls.runtime), timeout=BOOT_TIMEOUT,
                                      shares=[str(cls.share)], spec=image.ImageSpec(agent=AGENT),
                                      agent_args=[f"--share=s0={cls.share}"])
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

    # ---- across the VM boundary, through both agents ----

    @classmethod
    def host_agent(cls, share: bool = True) -> dict:
        """Starts vbridge-host on the VM's virtio-serial channel (again if `share` changes); returns the docker
        environment. With `share`, it replays the shared folder's changes in the guest."""
        if cls.host_proc is not None and cls.host_proc.poll() is None and getattr(cls, "host_share", True) != share:
            cls.host_proc.kill()
            cls.host_proc.wait(10)
        if cls.host_proc is None or cls.host_proc.poll() is not None:
            log = open(cls.runtime / "host.log", "ab")
            cls.host_share = share
            cls.host_proc = subprocess.Popen(
                [HOST_AGENT, "-t", f"unix:{cls.state['agent_socket']}", "--serial-chardev", "-i", "e2e",
                 "--runtime-dir", str(cls.runtime / "host"), "--no-docker-context", "--log-level", "debug",
                 *(["--share", f"s0={cls.share}"] if share else [])], stdout=log, stderr=log)
        sock = cls.runtime / "host" / "docker.sock"
        env = dict(os.environ, DOCKER_HOST=f"unix://{sock}")
        wait(lambda: subprocess.run(["docker", "version"], env=env, capture_output=True).returncode == 0, 60,
             "docker version through the bridge")
        if not getattr(cls, "image_imported", False):
            tar = cls.runtime / "busybox.tar"
            tar.write_bytes(image.busybox_tar())
            subprocess.run(["docker", "import", str(tar), "vbridge/busybox"], env=env, check=True, capture_output=True)
            cls.image_imported = True
        return env

    @unittest.skipUnless(AGENT and HOST_AGENT, "needs VBRIDGE_GUEST_AGENT and VBRIDGE_HOST_AGENT")
    def test_docker_across_the_vm_boundary(self) -> None:
        env = self.host_agent()
        r = subprocess.run(["docker", "run", "--rm", "-v", f"{self.share}:/data", "vbridge/busybox", "sh", "-c",
                            "cat /data/from-host.txt && echo written in the guest > /data/from-guest.txt"],
                           env=env, capture_output=True, text=True, timeout=120)
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertEqual(r.stdout, "hello from the host\n")
        self.assertEqual((self.share / "from-guest.txt").read_text(), "written in the guest\n")
        # stdin's EOF crosses the VM as a half-close: `docker exec -i` returns.
        cid = subprocess.run(["docker", "run", "-d", "vbridge/busybox", "sleep", "600"], env=env, check=True,
                             capture_output=True, text=True).stdout.strip()
        try:
            r = subprocess.run(["docker", "exec", "-i", cid, "cat"], input="hi\n", env=env, capture_output=True,
                               text=True, timeout=60)
            self.assertEqual((r.returncode, r.stdout), (0, "hi\n"), r.stderr)
        finally:
            subprocess.run(["docker", "rm", "-f", cid], env=env, capture_output=True)

    @unittest.skipUnless(AGENT and HOST_AGENT, "needs VBRIDGE_GUEST_AGENT and VBRIDGE_HOST_AGENT")
    def test_guest_port_reaches_the_host(self) -> None:
        env = self.host_agent()
        port = 18089
        self.assertFalse(connects(port), "the port is open on the host before the guest listens")
        cid = subprocess.run(["docker", "run", "-d", "--network", "host", "vbridge/busybox", "sh", "-c",
                              f"mkdir -p /www && echo served by the guest > /www/index.html && "
                              f"httpd -f -p {port} -h /www"], env=env, check=True, capture_output=True,
                             text=True).stdout.strip()
        try:
            wait(lambda: fetch(port) == "served by the guest\n", 60, "the guest's web server on the host")
        finally:
            subprocess.run(["docker", "rm", "-f", cid], env=env, capture_output=True)
        wait(lambda: not connects(port), 10, "the host port to go with the guest's listener")

    @unittest.skipUnless(AGENT and HOST_AGENT, "needs VBRIDGE_GUEST_AGENT and VBRIDGE_HOST_AGENT")
    def test_host_file_change_fires_inotify_in_the_guest_over_9p(self) -> None:
        # inotifywait of the guest's root filesystem, in a container that chroots into it, watching the 9p share.
        def start_watcher(env: dict) -> str:
            cid = subprocess.run(["docker", "run", "-d", "-v", "/:/host", "vbridge/busybox", "chroot", "/host",
                                  "inotifywait", "-m", "-e", "create,modify,attrib,close_write", str(self.share)],
                                 env=env, check=True, capture_output=True, text=True).stdout.strip()
            wait(lambda: "Watches established" in logs(env, cid), 30, "inotifywait in the guest to be ready")
            return cid

        def logs(env: dict, cid: str) -> str:
            r = subprocess.run(["docker", "logs", cid], env=env, capture_output=True, text=True)
            return r.stdout + r.stderr

        # Without file events (a host agent without --share), 9p delivers nothing for a host-side change.
        env = self.host_agent(share=False)
        cid = start_watcher(env)
        try:
            (self.share / "gap-probe.txt").write_text("x\n")
            time.sleep(1.5)
            self.assertNotIn("gap-probe.txt", logs(env, cid), "9p delivered the host change without vbridge")
        finally:
            subprocess.run(["docker", "rm", "-f", cid], env=env, capture_output=True)
        # With it, the same kind of change fires inotify in the guest.
        env = self.host_agent(share=True)
        cid = start_watcher(env)
        try:
            (self.share / "changed-on-host.txt").write_text("new\n")
            wait(lambda: "changed-on-host.txt" in logs(env, cid), 20, "inotifywait in the guest to see the change")
        finally:
            subprocess.run(["docker", "rm", "-f", cid], env=env, capture_output=True)

    @unittest.skipUnless(AGENT and HOST_AGENT, "needs VBRIDGE_GUEST_AGENT and VBRIDGE_HOST_AGENT")
    def test_zz_host_agent_restart_reconnects_over_serial(self) -> None:
        cls = type(self)
        self.host_agent()
        cls.host_proc.kill()
        cls.host_proc.wait(10)
        started = time.monotonic()
        env = self.host_agent()  # a new host agent on the same virtio-serial channel
        r = subprocess.run(["docker", "run", "--rm", "vbridge/busybox", "echo", "ok"], env=env, capture_output=True,
                           text=True, timeout=120)
        self.assertEqual((r.returncode, r.stdout), (0, "ok\n"), r.stderr)
        sys.stderr.write(f"\n  host agent restart to a working docker: {time.monotonic() - started:.1f} s\n")


def wait(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(0.1)


def connects(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex(("127.0.0.1", port)) == 0


def fetch(port: int) -> str:
    r = subprocess.run(["curl", "-sS", "--max-time", "5", f"http://127.0.0.1:{port}/"], capture_output=True, text=True)
    return r.stdout


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


VBRIDGE = HERE.parent.parent / "vbridge"


def sockets_under(folder: Path) -> list[str]:
    return [os.path.join(root, f) for root, _dirs, files in os.walk(folder) for f in files
            if stat.S_ISSOCK(os.lstat(os.path.join(root, f)).st_mode)]


@unittest.skipIf(skip_reason(), skip_reason())
@unittest.skipUnless(AGENT and HOST_AGENT, "needs VBRIDGE_GUEST_AGENT and VBRIDGE_HOST_AGENT")
class VbridgeUpStatusDown(unittest.TestCase):
    """tools/vbridge itself on the real VM: up (config file + flags), status, docker, down; and a guest that
    never answers within --boot-timeout."""

    def setUp(self) -> None:
        self.tmp = Path(tempfile.mkdtemp(prefix="vbup-", dir="/tmp"))
        self.addCleanup(shutil.rmtree, self.tmp, True)
        self.runtime = self.tmp / "run"
        self.env = dict(os.environ, VBRIDGE_RUNTIME_DIR=str(self.runtime), VBRIDGE_GUEST_AGENT=AGENT,
                        VBRIDGE_BUILD_DIR=str(Path(HOST_AGENT).resolve().parent.parent),
                        XDG_CONFIG_HOME=str(self.tmp / "config"), DOCKER_CONFIG=str(self.tmp / "docker-config"))

    def vbridge(self, *args: str, timeout: float = BOOT_TIMEOUT + 120) -> subprocess.CompletedProcess:
        r = subprocess.run([sys.executable, str(VBRIDGE), *args], capture_output=True, text=True, env=self.env,
                           timeout=timeout)
        sys.stderr.write(r.stderr)
        return r

    def assert_down_leaves_nothing(self, instance: str) -> None:
        folder = self.runtime / instance
        self.assertTrue(no_qemu_of(folder), "QEMU still running")
        self.assertEqual(sockets_under(self.runtime), [])
        self.assertFalse((folder / "pids.json").exists())
        self.assertEqual(list(Path("/dev/shm").glob(f"vbridge-{os.getuid()}-{instance}-*.shm")), [],
                         "shared memory left")

    def test_guest_that_never_answers(self) -> None:
        self.addCleanup(self.vbridge, "down", "--instance", "mute")
        r = self.vbridge("up", "--instance", "mute", "--boot-timeout", "3", "--accel", "tcg")
        self.assertEqual(r.returncode, 1)
        self.assertIn("guest did not answer within 3 s", r.stderr)
        self.assertIn("vbridge: the VM did not start", r.stderr)
        self.assertIn("stopping what was started for instance mute", r.stderr)
        self.assert_down_leaves_nothing("mute")
        r = self.vbridge("down", "--instance", "mute")
        self.assertEqual((r.returncode, r.stdout.strip()), (0, "vbridge: instance mute is not up"))
        self.assert_down_leaves_nothing("mute")

    def test_up_status_docker_down(self) -> None:
        share = self.tmp / "share"
        share.mkdir()
        (share / "hello.txt").write_text("from the host\n")
        conf = self.tmp / "config" / "vbridge" / "cli.toml"
        conf.parent.mkdir(parents=True)
        conf.write_text(f'memory = "1G"\nboot_timeout = {BOOT_TIMEOUT:g}\nshares = ["{share}"]\ncpus = 2\n')
        self.addCleanup(self.vbridge, "down", "--instance", "cli")
        r = self.vbridge("up", "--instance", "cli", "--cpus", "1")
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertIn("docker --context vbridge-cli run --rm vbridge-busybox echo ok", r.stdout)
        d = subprocess.run(["docker", "--context", "vbridge-cli", "run", "--rm", "-v", f"{share}:/data",
                            "vbridge-busybox", "cat", "/data/hello.txt"], capture_output=True, text=True,
                           env=self.env, timeout=180)
        self.assertEqual((d.returncode, d.stdout), (0, "from the host\n"), d.stderr)
        r = self.vbridge("status", "--instance", "cli", "--json")
        self.assertEqual(r.returncode, 0)
        doc = json.loads(r.stdout)
        self.assertEqual(doc["mode"], "vm")
        self.assertEqual(doc["config_file"], str(conf))
        vm = doc["vm"]
        self.assertEqual((vm["state"], vm["channel"], vm["cpus"], vm["memory_mib"]), ("ready", "serial", 1, 1024))
        self.assertIn(vm["accel"], ("kvm", "tcg"))
        self.assertTrue(doc["host_agent"]["running"])
        self.assertTrue(doc["bridge"]["connected"])
        self.assertEqual(doc["bridge"]["transport"], f"unix:{self.runtime / 'cli' / 'agent.sock'}")
        self.assertGreater(doc["bridge"]["mux"]["bytes_out"], 0)
        self.assertEqual(doc["bridge"]["file_events"]["shares"], 1)
        # Stream bytes crossed the VM boundary by reference, through the ivshmem device.
        shm = doc["bridge"]["shared_memory"]
        self.assertTrue(shm["active"], shm)
        self.assertGreater(shm["bytes_out_by_ref"], 0, shm)
        r = self.vbridge("status", "--instance", "cli")
        self.assertEqual(r.returncode, 0)
        self.assertRegex(r.stdout, rf"vm\s+ready, pid {vm['pid']}, (kvm|tcg), 1 vCPU, 1024 MiB")
        self.assertRegex(r.stdout, r"transport\s+unix:\S+agent.sock \(virtio-serial\), connected")
        self.assertRegex(r.stdout, r"shared memory\s+on, /dev/shm/vbridge-\d+-cli-[0-9a-f]{8}\.shm")
        pids = [vm["pid"], doc["host_agent"]["pid"]]
        r = self.vbridge("down", "--instance", "cli")
        self.assertEqual((r.returncode, r.stdout.strip()), (0, "vbridge: instance cli is down"))
        for pid in pids:
            self.assertFalse(launch.pid_alive(pid), f"pid {pid} still runs after down")
        self.assert_down_leaves_nothing("cli")


if __name__ == "__main__":
    unittest.main()
