"""Shows that the integration fixtures work: processes, waiting, workdirs, namespaces, and a real dockerd
driven by the real docker CLI directly on its socket (no vbridge in between)."""

import functools
import hashlib
import json
import os
import socket
import subprocess
import sys
import time
import unittest

import fixtures
from fixtures import Dockerd, FixtureError, FixtureTestCase, Netns, Process, WaitTimeout

IMAGE = "vbridge-busybox"
PY = sys.executable

SLEEPER = "import signal, time; {ignore}print('ready', flush=True); time.sleep(120)"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class WaitForTest(unittest.TestCase):
    def test_returns_the_truthy_value(self):
        calls = []

        def predicate():
            calls.append(1)
            return len(calls) >= 3 and "done"

        self.assertEqual(fixtures.wait_for(predicate, 5, "three calls"), "done")
        self.assertEqual(len(calls), 3)

    def test_timeout_names_what_and_last_error(self):
        def predicate():
            raise ConnectionRefusedError("nobody home")

        start = time.monotonic()
        with self.assertRaises(WaitTimeout) as cm:
            fixtures.wait_for(predicate, 0.2, "the moon to rise")
        self.assertLess(time.monotonic() - start, 2)
        self.assertIn("the moon to rise", str(cm.exception))
        self.assertIn("nobody home", str(cm.exception))

    def test_other_exceptions_abort_at_once(self):
        def predicate():
            raise KeyError("boom")

        with self.assertRaises(KeyError):
            fixtures.wait_for(predicate, 10, "never")


class ProcessTest(FixtureTestCase):
    def test_output_goes_to_log_files(self):
        p = Process(self.workdir, "hello", [PY, "-c", "import sys; print('out'); print('err', file=sys.stderr)"])
        self.assertEqual(p.wait_exit(10), 0)
        self.assertEqual(p.stdout(), "out\n")
        self.assertEqual(p.stderr(), "err\n")
        self.assertTrue(p.stdout_path.startswith(self.workdir.path))
        self.assertIn("out", p.logs())
        self.assertIn("err", p.logs())

    def test_terminate_uses_sigterm_first(self):
        p = Process(self.workdir, "polite", [PY, "-c", SLEEPER.format(ignore="")])
        p.wait_for_output("ready")
        self.assertEqual(p.terminate(), -15)

    def test_terminate_escalates_to_sigkill(self):
        p = Process(self.workdir, "stubborn", [PY, "-c", SLEEPER.format(ignore="signal.signal(15, signal.SIG_IGN); ")])
        p.wait_for_output("ready")
        start = time.monotonic()
        self.assertEqual(p.terminate(timeout=0.3), -9)
        self.assertLess(time.monotonic() - start, 5)

    def test_kill9(self):
        p = Process(self.workdir, "victim", [PY, "-c", SLEEPER.format(ignore="")])
        p.wait_for_output("ready")
        self.assertEqual(p.kill9(), -9)
        self.assertFalse(p.alive())

    def test_wait_exit_timeout_says_which_process(self):
        p = Process(self.workdir, "slowpoke", [PY, "-c", SLEEPER.format(ignore="")])
        with self.assertRaises(WaitTimeout) as cm:
            p.wait_exit(0.1)
        self.assertIn("slowpoke", str(cm.exception))

    def test_wait_for_output_fails_early_when_the_process_exits(self):
        p = Process(self.workdir, "quitter", [PY, "-c", "print('bye')"])
        start = time.monotonic()
        with self.assertRaises(FixtureError) as cm:
            p.wait_for_output("never printed", timeout=30)
        self.assertLess(time.monotonic() - start, 10)
        self.assertIn("bye", str(cm.exception))

    def test_same_name_gets_separate_logs(self):
        a = Process(self.workdir, "twin", [PY, "-c", "print('a')"])
        b = Process(self.workdir, "twin", [PY, "-c", "print('b')"])
        a.wait_exit(10)
        b.wait_exit(10)
        self.assertEqual((a.stdout(), b.stdout()), ("a\n", "b\n"))

    def test_scope_end_stops_everything_started_inside(self):
        with fixtures.scope():
            p = Process(self.workdir, "scoped", [PY, "-c", SLEEPER.format(ignore="")])
            p.wait_for_output("ready")
            self.assertIn(p, fixtures.live_processes())
        self.assertFalse(p.alive())
        self.assertNotIn(p, fixtures.live_processes())

    def test_wait_for_unix_socket_connects(self):
        path = self.workdir.join("s.sock")
        code = (
            "import socket, time; s = socket.socket(socket.AF_UNIX); time.sleep(0.2); "
            f"s.bind({path!r}); s.listen(); print('listening', flush=True); time.sleep(120)"
        )
        p = Process(self.workdir, "listener", [PY, "-c", code])
        fixtures.wait_for_unix_socket(path, timeout=10, process=p)
        self.assertTrue(fixtures.unix_socket_accepts(path))

    def test_wait_for_unix_socket_times_out(self):
        with self.assertRaises(WaitTimeout) as cm:
            fixtures.wait_for_unix_socket(self.workdir.join("nothing.sock"), timeout=0.1)
        self.assertIn("nothing.sock", str(cm.exception))


class WorkdirTest(unittest.TestCase):
    def test_short_path_and_cleanup_unmounts(self):
        with fixtures.scope():
            wd = fixtures.Workdir()
            self.assertTrue(wd.path.startswith("/tmp/vb"))
            self.assertLess(len(wd.path), 20)
            mnt = wd.mkdir("mnt")
            subprocess.run(["mount", "-t", "tmpfs", "tmpfs", mnt], check=True)
            wd.write("mnt/file", "x")
        self.assertFalse(os.path.exists(wd.path))
        with open("/proc/self/mountinfo") as f:
            self.assertNotIn(wd.path, f.read())


class NetnsTest(FixtureTestCase):
    def test_listener_inside_is_invisible_outside(self):
        ns = Netns(self.workdir)
        port = free_port()
        code = (
            "import socket, time; s = socket.socket(); "
            f"s.bind(('127.0.0.1', {port})); s.listen(); print('listening', flush=True); time.sleep(120)"
        )
        server = ns.spawn(self.workdir, "server", [PY, "-c", code])
        server.wait_for_output("listening")
        inside = ns.run([PY, "-c", f"import socket; socket.create_connection(('127.0.0.1', {port}), 5); print('ok')"])
        self.assertEqual(inside.stdout, "ok\n", inside.stderr)
        with self.assertRaises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", port), 5).close()

    def test_wrap_keeps_the_working_directory(self):
        ns = Netns(self.workdir)
        r = ns.run(["pwd"], cwd=self.workdir.path)
        self.assertEqual(r.stdout.strip(), self.workdir.path)
        links = ns.run(["ip", "-o", "link"], env={"PATH": fixtures.SBIN_PATH})
        self.assertEqual([line.split(":")[1].strip() for line in links.stdout.splitlines()], ["lo"])

    def test_isolated_one_off(self):
        r = subprocess.run(Netns.isolated(["cat", "/proc/net/dev"]), capture_output=True, text=True, timeout=30,
                           env={**os.environ, "PATH": fixtures.SBIN_PATH})  # fmt: skip
        self.assertEqual(r.returncode, 0, r.stderr)
        interfaces = [line.split(":")[0].strip() for line in r.stdout.splitlines()[2:]]
        self.assertEqual(interfaces, ["lo"])


class DockerCliTest(unittest.TestCase):
    def test_prefers_debian_client(self):
        env = os.environ.pop("VBRIDGE_DOCKER_CLI", None)
        try:
            if os.access("/usr/bin/docker", os.X_OK):
                self.assertEqual(fixtures.docker_cli(), "/usr/bin/docker")
            os.environ["VBRIDGE_DOCKER_CLI"] = "/opt/other/docker"
            self.assertEqual(fixtures.docker_cli(), "/opt/other/docker")
        finally:
            os.environ.pop("VBRIDGE_DOCKER_CLI", None)
            if env is not None:
                os.environ["VBRIDGE_DOCKER_CLI"] = env

    def test_busybox_rootfs_has_required_applets(self):
        import io
        import tarfile

        with tarfile.open(fileobj=io.BytesIO(fixtures.busybox_rootfs_tar())) as tar:
            members = {m.name: m for m in tar.getmembers()}
        self.assertTrue(members["bin/busybox"].isreg())
        for applet in fixtures.REQUIRED_APPLETS:
            self.assertTrue(members[f"bin/{applet}"].issym(), applet)
            self.assertEqual(members[f"bin/{applet}"].linkname, "busybox")


class DockerdTest(FixtureTestCase):
    """One dockerd for the class; each test talks to it with the real docker CLI."""

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        fixtures.require_dockerd()
        cls.dockerd = Dockerd(cls.class_workdir).start()
        fixtures.make_busybox_image(cls.dockerd.docker, IMAGE)

    def docker(self, *args, **kwargs):
        """Runs docker ARGS and asserts it succeeded."""
        r = self.dockerd.docker(list(args), **kwargs)
        self.assertEqual(r.returncode, 0, f"docker {' '.join(args)}: {r.stderr!r}\n{self.dockerd.logs()[-3000:]}")
        return r

    def test_version_reports_client_and_server(self):
        r = self.docker("version", "--format", "{{json .}}")
        info = json.loads(r.stdout)
        self.assertTrue(info["Client"]["Version"])
        self.assertTrue(info["Server"]["Version"])
        self.assertEqual(self.docker("info", "--format", "{{.DockerRootDir}}").stdout.strip(), self.dockerd.data_root)

    def test_api_over_the_socket(self):
        self.assertTrue(fixtures.docker_ping(self.dockerd.socket_path))
        status, headers, body = fixtures.unix_http(self.dockerd.socket_path, "GET", "/version")
        self.assertEqual(status, 200)
        self.assertIn("application/json", headers["content-type"])
        self.assertIn("ApiVersion", json.loads(body))

    def test_own_containerd(self):
        r = self.docker("info", "--format", "{{json .}}")
        self.assertTrue(self.dockerd.containerd.alive())
        self.assertTrue(os.path.exists(self.dockerd.containerd_socket))
        self.assertEqual(json.loads(r.stdout)["Driver"], self.dockerd.storage_driver)

    def test_image_imported(self):
        r = self.docker("image", "inspect", "--format", "{{json .Config.Env}}", IMAGE)
        self.assertIn("PATH=/bin", r.stdout)

    def test_run_echo(self):
        self.assertEqual(self.docker("run", "--rm", IMAGE, "echo", "ok").stdout, "ok\n")

    def test_run_without_network_flag_has_only_loopback(self):
        r = self.docker("run", "--rm", IMAGE, "cat", "/proc/net/dev")
        interfaces = [line.split(":")[0].strip() for line in r.stdout.splitlines()[2:]]
        self.assertEqual(interfaces, ["lo"])

    def test_run_network_none_and_host(self):
        self.assertEqual(self.docker("run", "--rm", "--network", "none", IMAGE, "echo", "ok").stdout, "ok\n")
        self.assertEqual(self.docker("run", "--rm", "--network", "host", IMAGE, "echo", "ok").stdout, "ok\n")

    def test_run_stdin(self):
        self.assertEqual(self.docker("run", "--rm", "-i", IMAGE, "cat", input="hi\n").stdout, "hi\n")

    def test_run_stdin_binary_roundtrip(self):
        data = os.urandom(1 << 20)
        r = self.docker("run", "--rm", "-i", IMAGE, "sha256sum", input=data)
        self.assertEqual(r.stdout.split()[0].decode(), hashlib.sha256(data).hexdigest())

    def test_applets(self):
        script = "for a in " + " ".join(fixtures.REQUIRED_APPLETS) + "; do command -v $a >/dev/null || echo $a; done"
        self.assertEqual(self.docker("run", "--rm", IMAGE, "sh", "-c", script).stdout, "")

    def test_exec_stdin_and_cp(self):
        cid = self.docker("run", "-d", IMAGE, "sleep", "300").stdout.strip()
        self.addCleanup(self.dockerd.docker, ["rm", "-f", cid])
        self.assertEqual(self.docker("exec", "-i", cid, "cat", input="hi\n").stdout, "hi\n")
        src = self.workdir.write("in.txt", "copied in\n")
        self.docker("cp", src, f"{cid}:/in.txt")
        self.assertEqual(self.docker("exec", cid, "cat", "/in.txt").stdout, "copied in\n")
        self.docker("cp", f"{cid}:/in.txt", self.workdir.join("out.txt"))
        with open(self.workdir.join("out.txt")) as f:
            self.assertEqual(f.read(), "copied in\n")

    def _build(self, tag, *flags, env=None):
        ctx = self.workdir.mkdir("ctx-" + tag)
        with open(os.path.join(ctx, "Dockerfile"), "w") as f:
            f.write(f"FROM {IMAGE}\nRUN echo built > /built.txt\nCOPY note.txt /note.txt\nCMD [\"cat\", \"/built.txt\", \"/note.txt\"]\n")
        with open(os.path.join(ctx, "note.txt"), "w") as f:
            f.write(f"{tag}\n")
        self.docker("build", *flags, "-t", tag, ctx, env=env)
        self.assertEqual(self.docker("run", "--rm", tag).stdout, f"built\n{tag}\n")

    def test_build_legacy_builder(self):
        self._build("legacy", env={"DOCKER_BUILDKIT": "0"})

    def test_build_buildkit_needs_network_host(self):
        self._build("buildkit", "--network", "host", env={"DOCKER_BUILDKIT": "1"})

    def test_docker_partial_for_make_busybox_image(self):
        fn = functools.partial(fixtures.docker, host_socket=self.dockerd.socket_path)
        self.assertEqual(fixtures.make_busybox_image(fn, "vbridge-busybox-2"), "vbridge-busybox-2")
        self.assertEqual(self.docker("run", "--rm", "vbridge-busybox-2", "echo", "two").stdout, "two\n")


class DockerdLifecycleTest(FixtureTestCase):
    def setUp(self):
        super().setUp()
        fixtures.require_dockerd()

    def test_two_in_sequence_and_clean_stop(self):
        for name in ("first", "second"):
            d = Dockerd(self.workdir, name).start()
            self.assertTrue(d.ping())
            d.stop()
            self.assertFalse(d.dockerd.alive())
            self.assertFalse(d.containerd.alive())
            self.assertFalse(d.ping())
            self.assertEqual(d.shim_pids(), [])

    def test_stop_with_a_running_container_is_quick(self):
        d = Dockerd(self.workdir).start()
        fixtures.make_busybox_image(d.docker)
        d.docker(["run", "-d", IMAGE, "sleep", "300"], check=True)  # PID 1 ignores SIGTERM
        start = time.monotonic()
        d.stop()
        self.assertLess(time.monotonic() - start, 5)
        self.assertEqual(d.dockerd.returncode, 0, d.logs())
        self.assertEqual(d.shim_pids(), [])

    def test_overlay2_driver(self):
        d = Dockerd(self.workdir, storage_driver="overlay2").start()
        fixtures.make_busybox_image(d.docker)
        r = d.docker(["run", "--rm", IMAGE, "echo", "ok"], check=True)
        self.assertEqual(r.stdout, "ok\n")
        self.assertEqual(d.docker(["info", "--format", "{{.Driver}}"], check=True).stdout.strip(), "overlay2")

    def test_kill9_of_dockerd_leaves_nothing_behind(self):
        d = Dockerd(self.workdir).start()
        fixtures.make_busybox_image(d.docker)
        d.docker(["run", "-d", IMAGE, "sleep", "300"], check=True)
        shims = d.shim_pids()
        self.assertEqual(len(shims), 1)
        container_pids = fixtures.descendants(shims[0])
        self.assertTrue(container_pids)
        d.dockerd.kill9()
        d.stop()
        for pid in [*shims, *container_pids]:
            fixtures.wait_for(lambda pid=pid: not os.path.exists(f"/proc/{pid}"), 10, f"pid {pid} to be gone")

    def test_inside_a_netns(self):
        ns = Netns(self.workdir)
        d = Dockerd(self.workdir, netns=ns).start()
        fixtures.make_busybox_image(d.docker)
        port = free_port()
        d.docker(["run", "-d", "--network", "host", IMAGE, "nc", "-ll", "-p", str(port), "-e", "echo", "pong"],
                 check=True)  # fmt: skip
        probe = f"import socket; print(socket.create_connection(('127.0.0.1', {port}), 5).recv(100).decode().strip())"
        fixtures.wait_for(lambda: ns.run([PY, "-c", probe]).stdout == "pong\n", 20, "nc in the netns to answer")
        with self.assertRaises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", port), 5).close()


if __name__ == "__main__":
    unittest.main()
