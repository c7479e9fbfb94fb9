"""tools/vbridge on bad input, and named instances side by side.

    VBRIDGE_BUILD_DIR=build python3 -m unittest discover -s tools/vm/tests -p 'test_cli.py' -v   # ctest: vm.cli

The bad-input cases fail in the pre-flight checks, before anything starts: QEMU missing from PATH, no room for
the guest image (a 16 MiB tmpfs as the image cache; root only), a docker.sock path another process listens on,
a published host port another process holds. Each is one line on stderr, exit status 1, and nothing is left
in the runtime folder. `LocalInstances` runs two `--mode local` instances (real dockerd + both agents in
namespaces; root, dockerd and the built agents needed) at once, checks that they share nothing, that a host
agent that dies during `up` takes the guest with it, and that `vbridge down` leaves no process or socket.
"""

from __future__ import annotations

import json
import os
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
VBRIDGE = HERE.parent.parent / "vbridge"
BUILD = Path(os.environ.get("VBRIDGE_BUILD_DIR", HERE.parent.parent.parent / "build"))


def sockets_under(folder: Path) -> list[str]:
    found = []
    for root, _dirs, files in os.walk(folder):
        for name in files:
            path = os.path.join(root, name)
            if stat.S_ISSOCK(os.lstat(path).st_mode):
                found.append(path)
    return found


class CliTest(unittest.TestCase):
    def setUp(self) -> None:
        self.tmp = Path(tempfile.mkdtemp(prefix="vbcli-", dir="/tmp"))
        self.addCleanup(shutil.rmtree, self.tmp, True)
        self.runtime = self.tmp / "run"
        self.env = dict(os.environ, VBRIDGE_RUNTIME_DIR=str(self.runtime), VBRIDGE_BUILD_DIR=str(BUILD),
                        XDG_CONFIG_HOME=str(self.tmp / "config"), DOCKER_CONFIG=str(self.tmp / "docker-config"))
        self.env.pop("VBRIDGE_MODE", None)

    def vbridge(self, *args: str, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, str(VBRIDGE), *args], capture_output=True, text=True,
                              env=env or self.env, timeout=timeout)

    def assert_one_line_error(self, r: subprocess.CompletedProcess, *fragments: str) -> None:
        self.assertEqual(r.returncode, 1, r.stdout + r.stderr)
        lines = r.stderr.strip().splitlines()
        self.assertEqual(len(lines), 1, r.stderr)
        self.assertTrue(lines[0].startswith("vbridge: "), lines[0])
        for fragment in fragments:
            self.assertIn(fragment, lines[0])

    def assert_nothing_left(self, instance: str) -> None:
        folder = self.runtime / instance
        self.assertEqual(sockets_under(self.runtime), [])
        self.assertFalse((folder / "pids.json").exists())
        r = self.vbridge("down", "--instance", instance)
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertIn("is not up", r.stdout)


class BadInput(CliTest):
    def test_missing_qemu(self) -> None:
        empty = self.tmp / "bin"
        empty.mkdir()
        r = self.vbridge("up", "--mode", "vm", "--instance", "noqemu", env=dict(self.env, PATH=str(empty)))
        self.assert_one_line_error(r, "qemu-system-x86_64 not found", "apt-get install --no-install-recommends "
                                   "qemu-system-x86")
        self.assertFalse((self.runtime / "noqemu").exists())
        self.assert_nothing_left("noqemu")

    @unittest.skipUnless(os.geteuid() == 0, "mounting a tmpfs needs root")
    def test_no_space_for_the_image(self) -> None:
        if not shutil.which("qemu-system-x86_64"):
            self.skipTest("qemu-system-x86 not installed")
        if not list(Path("/boot").glob("vmlinuz-*")):
            self.skipTest("no installed kernel (linux-image-amd64)")
        cache = self.tmp / "cache"
        cache.mkdir()
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "vbridge-test-cache", str(cache)], check=True)
        self.addCleanup(subprocess.run, ["umount", "-l", str(cache)], check=False)
        if not (BUILD / "host" / "vbridge-host").exists():
            self.skipTest(f"vbridge-host is not built in {BUILD}")
        r = self.vbridge("up", "--mode", "vm", "--instance", "nospace", env=dict(self.env, VBRIDGE_CACHE_DIR=str(cache)))
        self.assert_one_line_error(r, "not enough free disk space for building the guest image", "need 2.0 GiB",
                                   str(cache), "VBRIDGE_CACHE_DIR")
        self.assertEqual(list(cache.iterdir()), [])
        self.assertFalse((self.runtime / "nospace").exists())
        self.assert_nothing_left("nospace")

    def test_docker_socket_in_use(self) -> None:
        busy = self.tmp / "busy.sock"
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as srv:
            srv.bind(str(busy))
            srv.listen(0)  # a backlog that fills at once: a full one still means "in use"
            for mode in ("local", "vm", "local"):
                r = self.vbridge("up", "--mode", mode, "--instance", "busy", "--docker-socket", str(busy))
                self.assert_one_line_error(r, f"docker socket {busy} is in use", "choose another path")
            srv.settimeout(5)
            srv.accept()[0].close()  # still the listener's
        self.assertFalse((self.runtime / "busy").exists())
        self.assert_nothing_left("busy")

    def test_docker_socket_path_is_a_file(self) -> None:
        path = self.tmp / "docker.sock"
        path.write_text("not a socket")
        r = self.vbridge("up", "--mode", "local", "--instance", "file", "--docker-socket", str(path))
        self.assert_one_line_error(r, f"docker socket {path} exists and is not a socket")
        self.assertEqual(path.read_text(), "not a socket")

    def test_published_port_in_use(self) -> None:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp, \
                socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            tcp.bind(("127.0.0.1", 0))
            tcp.listen(1)
            udp.bind(("127.0.0.1", 0))
            tport, uport = tcp.getsockname()[1], udp.getsockname()[1]
            r = self.vbridge("up", "--mode", "local", "--instance", "port", "-p", f"{tport}:80")
            self.assert_one_line_error(r, f'publish "{tport}:80": host port 127.0.0.1:{tport}/tcp is in use')
            r = self.vbridge("up", "--mode", "local", "--instance", "port", "-p", "18000:80",
                             "-p", f"127.0.0.1:{uport}:53/udp")
            self.assert_one_line_error(r, f"host port 127.0.0.1:{uport}/udp is in use")
        self.assertFalse((self.runtime / "port").exists())
        self.assert_nothing_left("port")

    def test_status_and_down_of_an_instance_that_is_not_up(self) -> None:
        r = self.vbridge("status", "--instance", "never")
        self.assert_one_line_error(r, "instance never is not up")
        r = self.vbridge("down", "--instance", "never")
        self.assertEqual((r.returncode, r.stdout.strip()), (0, "vbridge: instance never is not up"))


def all_pids() -> list[int]:
    return [int(e) for e in os.listdir("/proc") if e.isdigit()]


def cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []


def is_shim_of(pid: int, containerd_socket: str) -> bool:
    argv = cmdline(pid)
    return bool(argv) and os.path.basename(argv[0]).startswith("containerd-shim") and containerd_socket in argv


def children_of(pid: int) -> list[int]:
    out = []
    for child in all_pids():
        try:
            if int(Path(f"/proc/{child}/stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                out.append(child)
        except (OSError, IndexError, ValueError):
            pass
    return out


def running(pid: int) -> bool:
    """Alive and not a zombie (an exited process waits for PID 1 to reap it)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except (OSError, IndexError):
        return False


def local_skip_reason() -> str:
    if os.geteuid() != 0:
        return "--mode local needs root (network and mount namespaces, dockerd)"
    for prog in ("dockerd", "containerd", "unshare", "docker"):
        if not shutil.which(prog, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin"):
            return f"{prog} not installed"
    for name in ("host/vbridge-host", "guest/vbridge-guest"):
        if not (BUILD / name).exists():
            return f"{name} is not built in {BUILD} (set VBRIDGE_BUILD_DIR)"
    return ""


@unittest.skipIf(local_skip_reason(), local_skip_reason())
class LocalInstances(CliTest):
    def up(self, instance: str, *flags: str) -> dict:
        self.addCleanup(self.vbridge, "down", "--instance", instance)
        r = self.vbridge("up", "--mode", "local", "--instance", instance, *flags)
        self.assertEqual(r.returncode, 0, r.stdout + r.stderr)
        return json.loads(self.vbridge("status", "--instance", instance, "--json").stdout)

    def docker(self, context: str, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["docker", "--context", context, *args], capture_output=True, text=True,
                              env=self.env, timeout=120)

    def test_down_stops_running_containers(self) -> None:
        self.up("c")
        # PID 1 in its container, `sleep` ignores SIGTERM: only a SIGKILL through containerd stops it.
        r = self.docker("vbridge-c", "run", "-d", "vbridge-busybox", "sleep", "1000")
        self.assertEqual(r.returncode, 0, r.stderr)
        containerd_socket = str(self.runtime / "c" / "guest" / "ctd" / "containerd.sock")
        shims = [pid for pid in all_pids() if is_shim_of(pid, containerd_socket)]
        self.assertEqual(len(shims), 1, f"shims of {containerd_socket}")
        container = children_of(shims[0])
        self.assertTrue(container, "the container's process")
        r = self.vbridge("down", "--instance", "c")
        self.assertEqual((r.returncode, r.stdout.strip()), (0, "vbridge: instance c is down"), r.stderr)
        for pid in shims + container:
            self.assertFalse(running(pid), f"pid {pid} (shim or container) outlived vbridge down")

    def test_two_instances_side_by_side(self) -> None:
        a = self.up("a")
        b = self.up("b")
        for doc, name in ((a, "a"), (b, "b")):
            self.assertTrue(doc["up"])
            self.assertEqual(doc["mode"], "local")
            self.assertTrue(doc["vm"]["running"])
            self.assertTrue(doc["host_agent"]["running"])
            self.assertTrue(doc["bridge"]["connected"], doc)
            self.assertEqual(doc["bridge"]["instance"], name)
            self.assertEqual(doc["runtime_dir"], str(self.runtime / name))
            # Each instance's agents share their own memory file.
            self.assertTrue(doc["bridge"]["shared_memory"]["active"], doc["bridge"]["shared_memory"])
        self.assertNotEqual(a["bridge"]["shared_memory"]["path"], b["bridge"]["shared_memory"]["path"])
        self.assertNotEqual(a["bridge"]["transport"], b["bridge"]["transport"])
        self.assertNotEqual(a["bridge"]["forwards"], b["bridge"]["forwards"])
        # Two dockerds: a container of a is not in b; each context reaches its own.
        r = self.docker("vbridge-a", "run", "--name", "only-in-a", "vbridge-busybox", "echo", "ok")
        self.assertEqual((r.returncode, r.stdout), (0, "ok\n"), r.stderr)
        self.assertIn("only-in-a", self.docker("vbridge-a", "ps", "-a").stdout)
        self.assertNotIn("only-in-a", self.docker("vbridge-b", "ps", "-a").stdout)
        # The status table has every part.
        r = self.vbridge("status", "--instance", "a")
        self.assertEqual(r.returncode, 0, r.stderr)
        for row in ("vm ", "host agent", "transport", "streams", "bytes", "forward", "errors"):
            self.assertIn(row, r.stdout)
        self.assertRegex(r.stdout, r"streams\s+\d+ open, \d+ opened")
        pids = [a["vm"]["pid"], a["host_agent"]["pid"]]
        # Stopping a leaves b working.
        r = self.vbridge("down", "--instance", "a")
        self.assertEqual((r.returncode, r.stdout.strip()), (0, "vbridge: instance a is down"), r.stderr)
        for pid in pids:
            self.assertFalse(running(pid), f"pid {pid} of instance a still runs")
        self.assertEqual(sockets_under(self.runtime / "a"), [])
        self.assertFalse(os.path.exists(a["bridge"]["shared_memory"]["path"]), "instance a's shared memory left")
        self.assertTrue(os.path.exists(b["bridge"]["shared_memory"]["path"]))
        r = self.docker("vbridge-b", "run", "--rm", "vbridge-busybox", "echo", "still ok")
        self.assertEqual((r.returncode, r.stdout), (0, "still ok\n"), r.stderr)
        # An instance that is up cannot be started twice.
        r = self.vbridge("up", "--mode", "local", "--instance", "b")
        self.assert_one_line_error(r, "instance b is already up")
        self.vbridge("down", "--instance", "b")
        self.assertEqual(sockets_under(self.runtime), [])

    def test_host_agent_that_dies_during_up_takes_the_guest_with_it(self) -> None:
        # --window-kib=1 is refused by vbridge-host: it exits at once, after the local guest started.
        r = self.vbridge("up", "--mode", "local", "--instance", "dies", "--host-arg=--window-kib=1")
        self.assertEqual(r.returncode, 1, r.stdout + r.stderr)
        self.assertIn("vbridge: the host agent exited:", r.stderr)
        self.assertIn("window-kib", r.stderr)
        self.assertIn("stopping what was started for instance dies", r.stderr)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and self.processes_of(self.runtime / "dies"):
            time.sleep(0.1)
        self.assertEqual(self.processes_of(self.runtime / "dies"), [])
        self.assert_nothing_left("dies")

    @staticmethod
    def processes_of(folder: Path) -> list[int]:
        found = []
        for pid in os.listdir("/proc"):
            if pid.isdigit():
                try:
                    if str(folder).encode() in Path(f"/proc/{pid}/cmdline").read_bytes() and running(int(pid)):
                        found.append(int(pid))
                except OSError:
                    pass
        return found


if __name__ == "__main__":
    unittest.main()
