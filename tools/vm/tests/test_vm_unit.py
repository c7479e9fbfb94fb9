"""Fast checks of the VM tools that boot nothing: keys, initramfs format, QEMU command line, error paths.

    python3 -m unittest discover -s tools/vm/tests -p 'test_vm_unit.py' -v
"""

from __future__ import annotations

import gzip
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import unittest
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import image  # noqa: E402
import launch  # noqa: E402
import vmcommon  # noqa: E402
from vmcommon import VmError  # noqa: E402


def quiet() -> vmcommon.Progress:
    return vmcommon.Progress(quiet=True)


def parse_newc(data: bytes) -> dict[str, tuple[int, bytes, tuple[int, int]]]:
    """name -> (mode, data, (rdevmajor, rdevminor)) of a cpio newc archive."""
    out = {}
    pos = 0
    while True:
        assert data[pos:pos + 6] == b"070701", f"bad magic at {pos}"
        fields = [int(data[pos + 6 + 8 * i:pos + 14 + 8 * i], 16) for i in range(13)]
        mode, size, rmaj, rmin, namesize = fields[1], fields[6], fields[9], fields[10], fields[11]
        name_start = pos + 110
        name = data[name_start:name_start + namesize - 1].decode()
        pos = name_start + namesize
        pos += -pos % 4
        body = data[pos:pos + size]
        pos += size
        pos += -pos % 4
        if name == "TRAILER!!!":
            return out
        out[name] = (mode, body, (rmaj, rmin))


class TmpDirTest(unittest.TestCase):
    def setUp(self) -> None:
        self.tmp = Path(tempfile.mkdtemp(prefix="vbvm-", dir="/tmp"))
        self.addCleanup(shutil.rmtree, self.tmp, True)


class SizesAndSpace(TmpDirTest):
    def test_parse_size(self) -> None:
        self.assertEqual(vmcommon.parse_size("4G"), 4 << 30)
        self.assertEqual(vmcommon.parse_size("512M"), 512 << 20)
        self.assertEqual(vmcommon.parse_size("2048"), 2048)
        with self.assertRaises(VmError):
            vmcommon.parse_size("lots")

    def test_free_space_error_names_need_and_place(self) -> None:
        target = self.tmp / "not" / "yet" / "there"
        with self.assertRaises(VmError) as ctx:
            vmcommon.check_free_space(target, 1 << 60, "the guest image")
        msg = str(ctx.exception)
        self.assertIn("not enough free disk space for the guest image", msg)
        self.assertIn(str(target), msg)
        self.assertIn("need 1048576.0 TiB", msg)
        vmcommon.check_free_space(target, 1, "the guest image")  # fine

    def test_missing_program_names_package(self) -> None:
        with self.assertRaises(VmError) as ctx:
            vmcommon.which_or_error("no-such-program-vbridge", "some-package", "for a test")
        self.assertIn("apt-get install --no-install-recommends some-package", str(ctx.exception))


class Keys(TmpDirTest):
    def setUp(self) -> None:
        super().setUp()
        if not vmcommon.find_kernels():
            self.skipTest("no installed kernel (linux-image-amd64)")

    def test_agent_changes_only_the_image_key(self) -> None:
        a = self.tmp / "a"
        b = self.tmp / "b"
        a.write_bytes(b"\x7fELF one")
        b.write_bytes(b"\x7fELF two")
        spec = image.ImageSpec(cache_dir=str(self.tmp))
        base0, key0, _, sha0 = image.image_keys(spec)
        base_a, key_a, _, _ = image.image_keys(image.ImageSpec(cache_dir=str(self.tmp), agent=str(a)))
        base_b, key_b, _, _ = image.image_keys(image.ImageSpec(cache_dir=str(self.tmp), agent=str(b)))
        self.assertEqual(sha0, "none")
        self.assertEqual(base0, base_a)
        self.assertEqual(base_a, base_b)
        self.assertEqual(len({key0, key_a, key_b}), 3)
        self.assertEqual(key_a, image.image_keys(image.ImageSpec(cache_dir=str(self.tmp), agent=str(a)))[1])

    def test_packages_change_the_base_key(self) -> None:
        base0 = image.image_keys(image.ImageSpec())[0]
        more = image.ImageSpec(packages=image.DEFAULT_PACKAGES + ["strace"])
        self.assertNotEqual(base0, image.image_keys(more)[0])
        reordered = image.ImageSpec(packages=list(reversed(image.DEFAULT_PACKAGES)))
        self.assertEqual(base0, image.image_keys(reordered)[0])

    def test_missing_agent_is_a_clear_error(self) -> None:
        with self.assertRaises(VmError) as ctx:
            image.image_keys(image.ImageSpec(agent=str(self.tmp / "missing")))
        self.assertIn("guest agent binary", str(ctx.exception))

    def test_module_closure_orders_dependencies_first(self) -> None:
        kernel = vmcommon.pick_kernel()
        notes: list[str] = []
        files = image.module_files(kernel, ["ext4", "no_such_module_vbridge"], notes.append)
        names = [os.path.basename(f).split(".")[0] for f in files]
        self.assertIn("ext4", names)
        self.assertLess(names.index("jbd2"), names.index("ext4"))
        self.assertTrue(any("no_such_module_vbridge" in n for n in notes))


class Initramfs(TmpDirTest):
    def test_cpio_writer_round_trip(self) -> None:
        w = image.CpioWriter()
        w.file("a/b/c.txt", b"hello", 0o640)
        w.symlink("bin/sh", "busybox")
        w.chardev("dev/console", 5, 1)
        entries = parse_newc(w.finish())
        self.assertEqual(entries["a/b/c.txt"][1], b"hello")
        self.assertEqual(entries["a/b/c.txt"][0], 0o100640)
        self.assertEqual(entries["a"][0] & 0o170000, 0o040000)
        self.assertEqual(entries["bin/sh"], (0o120777, b"busybox", (0, 0)))
        self.assertEqual(entries["dev/console"][2], (5, 1))

    def test_cpio_is_readable_by_cpio(self) -> None:
        if not shutil.which("cpio"):
            self.skipTest("no cpio binary")
        w = image.CpioWriter()
        w.file("etc/x", b"x")
        w.symlink("bin/sh", "busybox")
        r = subprocess.run(["cpio", "-t", "--quiet"], input=w.finish(), capture_output=True)
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertEqual(set(r.stdout.decode().split()), {"etc", "etc/x", "bin", "bin/sh"})

    def test_initramfs_has_init_busybox_console_and_modules(self) -> None:
        if not vmcommon.find_kernels():
            self.skipTest("no installed kernel (linux-image-amd64)")
        try:
            image.busybox_path()
        except VmError:
            self.skipTest("no busybox-static")
        out = self.tmp / "initramfs.cpio.gz"
        image.build_initramfs(vmcommon.pick_kernel(), out, lambda _m: None)
        entries = parse_newc(gzip.decompress(out.read_bytes()))
        self.assertIn("init", entries)
        self.assertEqual(entries["init"][0] & 0o777, 0o755)
        self.assertIn("bin/busybox", entries)
        self.assertEqual(entries["dev/console"][2], (5, 1))
        listed = entries["etc/vbridge/modules"][1].decode().split()
        self.assertEqual([os.path.basename(m).split(".")[0] for m in listed][-1], "ext4")
        for m in listed:
            self.assertIn(f"lib/modules/{m}", entries)

    def test_static_elf_detection(self) -> None:
        self.assertFalse(image.is_static_elf("/bin/sh"))
        if os.path.exists("/bin/busybox"):
            self.assertEqual(image.is_static_elf("/bin/busybox"),
                             b"statically linked" in subprocess.run(["file", "-L", "/bin/busybox"],
                                                                     capture_output=True).stdout
                             if shutil.which("file") else True)
        not_elf = self.tmp / "script"
        not_elf.write_text("#!/bin/sh\n")
        self.assertFalse(image.is_static_elf(str(not_elf)))


class Sockets(TmpDirTest):
    def test_live_socket_is_in_use(self) -> None:
        path = self.tmp / "live.sock"
        srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        srv.bind(str(path))
        srv.listen(1)
        self.addCleanup(srv.close)
        with self.assertRaises(VmError) as ctx:
            launch.claim_socket_path(path, "agent socket", quiet())
        self.assertIn("is in use", str(ctx.exception))
        self.assertTrue(path.exists())

    def test_stale_socket_is_removed(self) -> None:
        path = self.tmp / "stale.sock"
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.bind(str(path))
        s.close()  # bound, never listening: connect is refused
        launch.claim_socket_path(path, "agent socket", quiet())
        self.assertFalse(path.exists())

    def test_regular_file_is_not_replaced(self) -> None:
        path = self.tmp / "file.sock"
        path.write_text("data")
        with self.assertRaises(VmError) as ctx:
            launch.claim_socket_path(path, "agent socket", quiet())
        self.assertIn("not a socket", str(ctx.exception))
        self.assertEqual(path.read_text(), "data")

    def test_too_long_path(self) -> None:
        path = self.tmp / ("x" * 120)
        with self.assertRaises(VmError) as ctx:
            launch.claim_socket_path(path, "agent socket", quiet())
        self.assertIn("limited to 107", str(ctx.exception))


class CommandLine(TmpDirTest):
    def test_qemu_command(self) -> None:
        inst = launch.Instance.named("ci", str(self.tmp))
        img = self.tmp / "img"
        img.mkdir()
        share_dir = self.tmp / "src"
        share_dir.mkdir()
        cfg = launch.LaunchConfig(name="ci", shares=[str(share_dir)], agent_args=["--log-level=debug"])
        shares = [launch.Share.parse(str(share_dir), 0)]
        argv, cmdline = launch.qemu_command("/usr/bin/qemu-system-x86_64", inst, img, cfg, "tcg", "serial",
                                            inst.default_agent_socket, shares)
        joined = " ".join(argv)
        self.assertIn("-nic none", joined)
        self.assertIn("-accel tcg,thread=multi -cpu max -smp 1 -m 2048", joined)
        self.assertIn(f"socket,path={inst.default_agent_socket},server=on,wait=off", joined)
        self.assertIn("virtserialport,chardev=vbridge0,name=vbridge.0", joined)
        self.assertIn("snapshot=on", joined)
        self.assertIn(f"local,path={share_dir},mount_tag=vbshare0,security_model=none", joined)
        self.assertIn(f"vbridge.share=vbshare0:{share_dir}", cmdline)
        self.assertIn("vbridge.listen=serial:vbridge.0", cmdline)
        self.assertIn("vbridge.agent_args=--log-level=debug", cmdline)
        self.assertIn("apparmor=0", cmdline)
        self.assertNotIn("vhost-vsock", joined)
        self.assertIn(str(img / "vmlinuz"), argv)  # no vmlinux in this image: the compressed kernel
        (img / "vmlinux").write_bytes(b"")
        argv, _ = launch.qemu_command("q", inst, img, cfg, "kvm", "vsock", inst.default_agent_socket, [])
        self.assertIn(str(img / "vmlinux"), argv)
        self.assertIn("host", argv)
        self.assertIn("vhost-vsock-pci,guest-cid=3", argv)

    def test_share_validation(self) -> None:
        with self.assertRaises(VmError):
            launch.Share.parse(str(self.tmp / "missing"), 0)
        with self.assertRaises(VmError):
            launch.Share.parse(f"{self.tmp}:relative/path", 0)
        with self.assertRaises(VmError):
            launch.Share.parse(f"{self.tmp}:/with space", 0)
        s = launch.Share.parse(f"{self.tmp}:/work", 2)
        self.assertEqual((s.host, s.guest, s.tag), (str(self.tmp), "/work", "vbshare2"))

    def test_instance_names(self) -> None:
        for bad in ("", "../x", "a/b", "x" * 40, "-lead"):
            with self.assertRaises(VmError):
                launch.Instance.named(bad, str(self.tmp))
        self.assertEqual(launch.Instance.named("ci-1", str(self.tmp)).dir, self.tmp / "ci-1")


class Lifecycle(TmpDirTest):
    def test_missing_qemu(self) -> None:
        cfg = launch.LaunchConfig(name="noqemu", runtime_dir=str(self.tmp), qemu=str(self.tmp / "qemu"))
        with self.assertRaises(VmError) as ctx:
            launch.start(cfg, quiet())
        self.assertIn("not found", str(ctx.exception))
        self.assertIn("qemu-system-x86", ctx.exception.hint)
        self.assertFalse((self.tmp / "noqemu").exists())  # nothing left behind

    def test_socket_in_use_fails_before_booting(self) -> None:
        path = self.tmp / "busy.sock"
        srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        srv.bind(str(path))
        srv.listen(1)
        self.addCleanup(srv.close)
        cfg = launch.LaunchConfig(name="busy", runtime_dir=str(self.tmp), qemu="/bin/true",
                                  agent_socket=str(path), image=str(self.tmp))
        with self.assertRaises(VmError) as ctx:
            launch.start(cfg, quiet())
        self.assertIn("in use", str(ctx.exception))
        self.assertFalse((self.tmp / "busy").exists())

    def test_stop_of_unknown_instance_and_stale_files(self) -> None:
        self.assertEqual(launch.stop("never", runtime_dir=str(self.tmp), progress=quiet())["was_running"], False)
        inst = launch.Instance.named("stale", str(self.tmp))
        inst.dir.mkdir()
        inst.pidfile.write_text("999999999\n")
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.bind(str(inst.default_agent_socket))
        s.close()
        result = launch.stop("stale", runtime_dir=str(self.tmp), progress=quiet())
        self.assertFalse(result["was_running"])
        self.assertFalse(inst.pidfile.exists())
        self.assertFalse(inst.default_agent_socket.exists())

    def test_pid_of_another_program_is_not_ours(self) -> None:
        self.assertFalse(launch.is_our_qemu(os.getpid(), self.tmp))

    def test_serial_follower(self) -> None:
        log = self.tmp / "serial.log"
        f = launch.SerialFollower(log)
        self.assertEqual(f.lines(), [])
        log.write_bytes(b"one\r\ntw")
        self.assertEqual(f.lines(), ["one"])
        with open(log, "ab") as out:
            out.write(b"o\nVBRIDGE_READY dockerd=20.10 agent=running uptime=21.5\n")
        lines = f.lines()
        self.assertEqual(lines[0], "two")
        m = launch.READY_RE.search(lines[1])
        self.assertEqual(m.groups(), ("20.10", "running", "21.5"))


if __name__ == "__main__":
    unittest.main()
