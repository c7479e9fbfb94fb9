"""The Docker API through vbridge: the real docker CLI against a real dockerd behind the guest agent.

Layout: dockerd <- unix socket <- vbridge-guest <= one transport (unix socket) => vbridge-host -> docker.sock
"""

from __future__ import annotations

import hashlib
import os
import socket
import subprocess
import threading
import time
import unittest
from concurrent.futures import ThreadPoolExecutor

from agents import GuestAgent, HostAgent, hello_frame
from fixtures import (Dockerd, FixtureTestCase, Process, WaitTimeout, Workdir, defer, docker, docker_cli, docker_env,
                      docker_ping, make_busybox_image, require_dockerd, wait_for)

IMAGE = "vbridge-busybox"


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def write_random_file(path: str, size: int) -> str:
    h = hashlib.sha256()
    block = os.urandom(1 << 20)
    with open(path, "wb") as f:
        for i in range(size >> 20):
            # A different block each MiB, cheaply: the index makes every block unique.
            chunk = i.to_bytes(8, "little") + block[8:]
            h.update(chunk)
            f.write(chunk)
    return h.hexdigest()


class DockerBridgeTest(FixtureTestCase):
    @classmethod
    def setUpClass(cls) -> None:
        super().setUpClass()
        require_dockerd()
        wd = cls.class_workdir
        cls.dockerd = Dockerd(wd, storage_driver=os.environ.get("VBRIDGE_DOCKER_STORAGE_DRIVER", "overlay2")).start()
        cls.guest = GuestAgent(wd, docker_socket=cls.dockerd.socket_path).start()
        cls.host = HostAgent(wd, "unix:" + cls.guest.listen_path).start()
        cls.sock = cls.host.docker_socket
        make_busybox_image(lambda args, **kw: docker(args, cls.sock, **kw), IMAGE)

    @classmethod
    def tearDownClass(cls) -> None:
        cls.dockerd.kill_all_containers()
        super().tearDownClass()

    def docker(self, *args: str, **kwargs) -> subprocess.CompletedProcess:
        kwargs.setdefault("timeout", 120)
        return docker(list(args), self.sock, **kwargs)

    def ok(self, *args: str, **kwargs) -> str:
        r = self.docker(*args, **kwargs)
        self.assertEqual(r.returncode, 0, f"docker {' '.join(args)} failed: {r.stderr}")
        return r.stdout

    def container(self, *command: str, name: str | None = None, extra: tuple[str, ...] = ()) -> str:
        args = ["run", "-d", *extra]
        if name:
            args += ["--name", name]
        cid = self.ok(*args, IMAGE, *command).strip()
        defer(lambda: self.docker("rm", "-f", cid))
        return cid

    # ---- basic API ----

    def test_version_info_images(self) -> None:
        version = self.ok("version", "--format", "{{.Server.Version}}")
        self.assertTrue(version.strip())
        info = self.ok("info", "--format", "{{.Driver}}")
        self.assertTrue(info.strip())
        self.assertIn(IMAGE, self.ok("images", "--format", "{{.Repository}}"))

    def test_run_rm_prints_output(self) -> None:
        self.assertEqual(self.ok("run", "--rm", IMAGE, "echo", "ok").strip(), "ok")

    def test_import_through_bridge(self) -> None:
        # The class fixture imported the image through the bridge; a second tag proves it again.
        from fixtures import busybox_rootfs_tar

        out = self.ok("import", "-", "vbridge-busybox:again", input=busybox_rootfs_tar())
        self.assertTrue(out.strip())
        self.ok("rmi", "vbridge-busybox:again")

    # ---- streaming and hijacked connections ----

    def test_run_detached_then_follow_logs(self) -> None:
        cid = self.container("sh", "-c", "for i in 1 2 3 4 5; do echo line$i; sleep 0.1; done")
        out = self.ok("logs", "-f", cid, timeout=30)
        self.assertEqual(out.split(), ["line1", "line2", "line3", "line4", "line5"])

    def test_exec(self) -> None:
        cid = self.container("sleep", "3600")
        self.assertEqual(self.ok("exec", cid, "echo", "hi").strip(), "hi")

    def test_exec_stdin_eof_returns(self) -> None:
        # `echo hi | docker exec -i c cat` must print hi and exit: stdin's EOF crosses the bridge as a half-close.
        cid = self.container("sleep", "3600")
        r = self.docker("exec", "-i", cid, "cat", input="hi\n", timeout=30)
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertEqual(r.stdout, "hi\n")

    def test_run_interactive_stdin(self) -> None:
        r = self.docker("run", "--rm", "-i", IMAGE, "sh", "-c", "read x; echo got:$x", input="hello\n", timeout=60)
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertEqual(r.stdout.strip(), "got:hello")

    def test_attach_streams_output(self) -> None:
        cid = self.container("sh", "-c", "while true; do echo tick; sleep 0.1; done")
        attach = Process(self.workdir, "attach", [docker_cli(), "attach", "--no-stdin", cid],
                         env=docker_env(self.sock))
        attach.wait_for_output("tick", timeout=20)
        self.assertTrue(attach.alive())

    def test_events_stream_while_other_commands_run(self) -> None:
        events = Process(self.workdir, "events",
                         [docker_cli(), "events", "--format", "{{.Type}} {{.Action}}", "--filter", "type=container"],
                         env=docker_env(self.sock))
        # The stream is live once dockerd has registered it: run marker containers until one is reported.
        def marker_seen() -> bool:
            self.ok("run", "--rm", IMAGE, "true")
            try:
                wait_for(lambda: "container destroy" in events.stdout(), 3, "a marker container's events")
                return True
            except WaitTimeout:
                return False

        wait_for(marker_seen, 60, "container events to reach the stream", interval=0)
        for _ in range(3):
            self.ok("ps")
        self.assertTrue(events.alive(), "the events stream ended while other commands ran")
        before = events.stdout().count("container start")
        self.ok("run", "--rm", IMAGE, "true")
        wait_for(lambda: events.stdout().count("container start") > before, 20, "a further start event")

    # ---- bulk ----

    def test_cp_512_mib_both_ways(self) -> None:
        src = self.workdir.join("big.bin")
        digest = write_random_file(src, 512 << 20)
        cid = self.container("sleep", "3600")
        self.ok("cp", src, f"{cid}:/big.bin", timeout=300)
        inside = self.ok("exec", cid, "sha256sum", "/big.bin").split()[0]
        self.assertEqual(inside, digest)
        out = self.workdir.join("back.bin")
        self.ok("cp", f"{cid}:/big.bin", out, timeout=300)
        os.unlink(src)
        self.assertEqual(sha256_file(out), digest)
        os.unlink(out)

    def test_build_with_256_mib_context(self) -> None:
        ctx = self.workdir.mkdir("ctx")
        digest = write_random_file(os.path.join(ctx, "payload.bin"), 256 << 20)
        with open(os.path.join(ctx, "Dockerfile"), "w") as f:
            f.write(f"FROM {IMAGE}\nCOPY payload.bin /payload.bin\nCMD [\"sha256sum\", \"/payload.bin\"]\n")
        r = self.docker("build", "-t", "vbridge-built", ctx, env={"DOCKER_BUILDKIT": "0"}, timeout=600)
        self.assertEqual(r.returncode, 0, r.stderr)
        defer(lambda: self.docker("rmi", "-f", "vbridge-built"))
        self.assertEqual(self.ok("run", "--rm", "vbridge-built").split()[0], digest)

    def test_fifty_concurrent_ps(self) -> None:
        with ThreadPoolExecutor(max_workers=50) as pool:
            results = list(pool.map(lambda _: self.docker("ps", "-q", timeout=120), range(50)))
        failures = [r.stderr for r in results if r.returncode != 0]
        self.assertEqual(failures, [])


class GuestRestartTest(FixtureTestCase):
    """Restarting the guest agent mid-stream: in-flight streams fail, new commands work, no host restart."""

    def test_guest_agent_restart(self) -> None:
        require_dockerd()
        dockerd = Dockerd(self.workdir, storage_driver="overlay2").start()
        guest = GuestAgent(self.workdir, docker_socket=dockerd.socket_path).start()
        host = HostAgent(self.workdir, "unix:" + guest.listen_path).start()
        sock = host.docker_socket
        make_busybox_image(lambda args, **kw: docker(args, sock, **kw), IMAGE)
        cid = docker(["run", "-d", IMAGE, "sh", "-c", "while true; do echo tick; sleep 0.1; done"], sock,
                     check=True).stdout.strip()
        follow = Process(self.workdir, "logs", [docker_cli(), "logs", "-f", cid], env=docker_env(sock))
        follow.wait_for_output("tick", timeout=20)

        guest.kill9()
        # The in-flight stream ends with an error instead of hanging.
        follow.wait_exit(10)
        self.assertNotEqual(follow.returncode, 0)

        restarted = GuestAgent(self.workdir, docker_socket=dockerd.socket_path, name="guest2",
                               listen=guest.listen_path).start()
        started = time.monotonic()
        wait_for(lambda: docker_ping(sock, timeout=1.0), 1.0, "the bridge to serve again within 1 s of the restart",
                 ignore=(OSError,))
        elapsed = time.monotonic() - started
        self.assertEqual(docker(["ps", "-q"], sock).returncode, 0)
        self.assertEqual(host.process.returncode, None, "the host agent must keep running")
        self.assertIn(cid[:12], docker(["ps", "-q"], sock).stdout)
        docker(["rm", "-f", cid], sock)
        print(f"bridge served again {elapsed * 1000:.0f} ms after the guest agent restarted")
        del restarted


class BadPeerTest(FixtureTestCase):
    def test_no_dockerd_in_guest_names_the_guest_socket(self) -> None:
        missing = self.workdir.join("no-dockerd.sock")
        guest = GuestAgent(self.workdir, docker_socket=missing).start()
        host = HostAgent(self.workdir, "unix:" + guest.listen_path).start()
        r = docker(["version"], host.docker_socket, timeout=30)
        self.assertNotEqual(r.returncode, 0)
        self.assertIn(missing, r.stdout + r.stderr)

    def test_host_refuses_peer_of_another_version(self) -> None:
        path = self.workdir.join("fake-guest.sock")
        server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        server.bind(path)
        server.listen(4)
        defer(server.close)

        def serve() -> None:
            for _ in range(2):
                try:
                    conn, _ = server.accept()
                except OSError:
                    return
                conn.sendall(hello_frame(9))
                conn.close()

        threading.Thread(target=serve, daemon=True).start()
        host = HostAgent(self.workdir, "unix:" + path).start(wait_connected=False)
        host.process.wait_for_output("version 9", timeout=10)
        log = host.process.output()
        self.assertIn("this agent speaks version 1", log)
        self.assertTrue(host.process.alive())

    def test_host_without_guest_answers_clients_with_clear_error(self) -> None:
        host = HostAgent(self.workdir, "unix:" + self.workdir.join("nobody.sock"),
                         extra=["--keepalive-ms", "1000"]).start(wait_connected=False)
        env_start = time.monotonic()
        r = docker(["version"], host.docker_socket, timeout=30)
        self.assertNotEqual(r.returncode, 0)
        self.assertIn("not connected", r.stdout + r.stderr)
        self.assertLess(time.monotonic() - env_start, 25)


if __name__ == "__main__":
    unittest.main()
