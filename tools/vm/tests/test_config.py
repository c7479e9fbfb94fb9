"""vbridge's configuration: precedence, each kind of error, the example file, per-instance paths.

    python3 -m unittest discover -s tools/vm/tests -p 'test_config.py' -v      # ctest: vm.config (label unit)
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import unittest
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import vbconfig  # noqa: E402
from vbconfig import ConfigError  # noqa: E402

VBRIDGE = HERE.parent.parent / "vbridge"
EXAMPLE = HERE.parent / "vbridge.example.toml"

try:
    import tomllib  # noqa: F401
    HAVE_TOML = True
except ImportError:
    HAVE_TOML = False


@unittest.skipUnless(HAVE_TOML, "reading TOML needs Python 3.11 (tomllib)")
class ConfigTest(unittest.TestCase):
    def setUp(self) -> None:
        self.tmp = Path(tempfile.mkdtemp(prefix="vbcfg-", dir="/tmp"))
        self.addCleanup(shutil.rmtree, self.tmp, True)
        self.env = {"XDG_CONFIG_HOME": str(self.tmp / "xdg")}

    def write(self, text: str, name: str = "c.toml") -> Path:
        path = self.tmp / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        return path

    def resolve(self, instance: str = "default", file: Path | None = None, cli: dict | None = None,
                env: dict | None = None) -> vbconfig.Config:
        saved = os.environ.get("XDG_CONFIG_HOME")
        os.environ["XDG_CONFIG_HOME"] = self.env["XDG_CONFIG_HOME"]
        try:
            return vbconfig.resolve(instance, str(file) if file else None, cli or {}, env if env is not None else {})
        finally:
            if saved is None:
                del os.environ["XDG_CONFIG_HOME"]
            else:
                os.environ["XDG_CONFIG_HOME"] = saved

    def error(self, text: str, cli: dict | None = None) -> str:
        path = self.write(text)
        with self.assertRaises(ConfigError) as ctx:
            self.resolve(file=path, cli=cli)
        msg = str(ctx.exception)
        self.assertNotIn("\n", msg)
        return msg


class Precedence(ConfigTest):
    def test_defaults(self) -> None:
        cfg = self.resolve()
        self.assertIsNone(cfg.file)
        self.assertEqual((cfg.mode, cfg.accel, cfg.transport, cfg.cpus, cfg.memory), ("vm", "auto", "serial", 1, 2048))
        self.assertEqual(cfg.vsock_cid, 3)
        self.assertTrue(all(src == "default" for src in cfg.sources.values()))

    def test_file_over_default_and_flag_over_file(self) -> None:
        path = self.write('cpus = 2\nmemory = "3G"\naccel = "tcg"\npublish = ["8080:80", "9090:90"]\n')
        cfg = self.resolve(file=path, cli={"cpus": "4", "publish": ["7070:70"], "accel": None, "shares": []})
        self.assertEqual(cfg.cpus, 4)
        self.assertEqual(cfg.sources["cpus"], "--cpus")
        self.assertEqual(cfg.memory, 3072)
        self.assertEqual(cfg.sources["memory"], str(path))
        self.assertEqual(cfg.accel, "tcg")  # flag not given: the file's value stays
        self.assertEqual(cfg.publish, ["7070:70"])  # a list flag replaces the file's list
        self.assertEqual(cfg.shares, [])
        self.assertEqual(cfg.sources["shares"], "default")

    def test_environment_mode_is_below_the_file(self) -> None:
        self.assertEqual(self.resolve(env={"VBRIDGE_MODE": "local"}).mode, "local")
        path = self.write('mode = "vm"\n')
        cfg = self.resolve(file=path, env={"VBRIDGE_MODE": "local"})
        self.assertEqual((cfg.mode, cfg.sources["mode"]), ("vm", str(path)))

    def test_default_file_is_per_instance(self) -> None:
        self.write("cpus = 3\n", "xdg/vbridge/a.toml")
        self.assertEqual(self.resolve("a").cpus, 3)
        self.assertEqual(self.resolve("a").file, self.tmp / "xdg" / "vbridge" / "a.toml")
        self.assertEqual(self.resolve("b").cpus, 1)
        self.assertIsNone(self.resolve("b").file)

    def test_bool_flag_overrides_file(self) -> None:
        path = self.write("follow_ports = false\n")
        self.assertFalse(self.resolve(file=path).follow_ports)
        self.assertTrue(self.resolve(file=path, cli={"follow_ports": True}).follow_ports)


class Errors(ConfigTest):
    def test_unknown_key_names_file_line_and_known_keys(self) -> None:
        msg = self.error('cpus = 1\n\nmemroy = 4096\n')
        self.assertIn(str(self.tmp / "c.toml"), msg)
        self.assertIn('line 3: key "memroy" is not known', msg)
        self.assertIn('did you mean "memory"?', msg)
        self.assertIn("known: mode, accel, transport", msg)

    def test_table_is_an_unknown_key(self) -> None:
        self.assertIn('line 1: key "vm" is not known', self.error("[vm]\ncpus = 1\n"))

    def test_wrong_type(self) -> None:
        self.assertIn('line 2: key "cpus" must be an integer 1-64, not "two"', self.error('mode = "vm"\ncpus = "two"\n'))
        self.assertIn('key "follow_ports" must be true or false, not 1', self.error("follow_ports = 1\n"))
        self.assertIn('key "shares" must be a list of strings, not "/src"', self.error('shares = "/src"\n'))

    def test_bad_values(self) -> None:
        self.assertIn('key "accel" must be one of "auto", "kvm", "tcg", not "hvf"', self.error('accel = "hvf"\n'))
        self.assertIn('key "cpus" must be an integer 1-64, not 0', self.error("cpus = 0\n"))
        self.assertIn('key "memory" must be MiB', self.error('memory = "lots"\n'))
        self.assertIn('"99999:80" is not [ADDR:]HOSTPORT:GUESTPORT', self.error('publish = ["99999:80"]\n'))
        self.assertIn('"80:8080" is not GUESTPORT=HOSTPORT', self.error('port_map = ["80:8080"]\n'))
        self.assertIn("is not HOST_PATH=GUEST_TARGET", self.error('forwards = ["relative.sock=x"]\n'))
        self.assertIn("an absolute guest path", self.error('shares = ["/src:relative"]\n'))
        self.assertIn('must be an IPv4 address, not "::1"', self.error('bind_address = "::1"\n'))
        self.assertIn("must be an absolute path", self.error('docker_socket = "docker.sock"\n'))
        self.assertIn("without ',' or spaces", self.error('guest_args = ["--a b"]\n'))

    def test_not_toml(self) -> None:
        msg = self.error("cpus = \n")
        self.assertIn("not valid TOML", msg)
        self.assertIn("line 1", msg)

    def test_flag_errors_name_the_flag(self) -> None:
        path = self.write("")
        with self.assertRaises(ConfigError) as ctx:
            self.resolve(file=path, cli={"memory": "100"})
        self.assertTrue(str(ctx.exception).startswith('--memory: key "memory" must be MiB'))

    def test_missing_config_file_and_bad_instance(self) -> None:
        with self.assertRaises(ConfigError) as ctx:
            self.resolve(file=self.tmp / "missing.toml")
        self.assertIn("missing.toml: no such file", str(ctx.exception))
        for bad in ("../x", "a/b", "", "-x", "x" * 33):
            with self.assertRaises(ConfigError):
                self.resolve(bad)

    def test_cli_rejects_a_bad_file_before_starting_anything(self) -> None:
        path = self.write('memroy = 4096\n')
        runtime = self.tmp / "run"
        r = subprocess.run([sys.executable, str(VBRIDGE), "up", "--config", str(path), "--instance", "cfgerr"],
                           capture_output=True, text=True, env=dict(os.environ, VBRIDGE_RUNTIME_DIR=str(runtime)),
                           timeout=60)
        self.assertEqual(r.returncode, 1)
        self.assertEqual(r.stdout, "")
        self.assertEqual(r.stderr.count("\n"), 1, r.stderr)
        self.assertTrue(r.stderr.startswith(f'vbridge: {path}: line 1: key "memroy" is not known'), r.stderr)
        self.assertFalse(runtime.exists())


class Example(ConfigTest):
    def test_example_file_parses_and_shows_every_key(self) -> None:
        values = vbconfig.load_file(EXAMPLE)
        text = EXAMPLE.read_text()
        for key in vbconfig.KEYS:
            self.assertRegex(text, rf"(?m)^#? ?{key.name} = ", f"{key.name} is not in the example")
        self.assertEqual(values["memory"], 2048)
        self.assertEqual(values["publish"], ["8080:80", "127.0.0.1:5353:53/udp"])

    def test_config_show_reports_sources(self) -> None:
        r = subprocess.run([sys.executable, str(VBRIDGE), "config", "show", "--config", str(EXAMPLE), "--cpus", "4",
                            "--json"], capture_output=True, text=True, timeout=60)
        self.assertEqual(r.returncode, 0, r.stderr)
        doc = json.loads(r.stdout)
        self.assertEqual((doc["values"]["cpus"], doc["sources"]["cpus"]), (4, "--cpus"))
        self.assertEqual(doc["sources"]["memory"], str(EXAMPLE))
        self.assertEqual(doc["sources"]["vsock_cid"], "default")
        self.assertEqual(doc["paths"]["docker_context"], "vbridge-example")


class InstancePaths(ConfigTest):
    def test_two_instances_share_no_path_or_name(self) -> None:
        runtime = Path("/run/user/1000/vbridge")
        a = vbconfig.instance_paths(self.resolve("a"), runtime)
        b = vbconfig.instance_paths(self.resolve("b"), runtime)
        d = vbconfig.instance_paths(self.resolve("default"), runtime)
        for name in a:
            self.assertEqual(len({str(a[name]), str(b[name]), str(d[name])}), 3, name)
        self.assertEqual((d["docker_context"], a["docker_context"]), ("vbridge", "vbridge-a"))
        self.assertEqual(d["vsock_cid"], 3)
        self.assertGreater(a["vsock_cid"], 3)
        self.assertTrue(a["docker_socket"].startswith(a["runtime_dir"] + "/"))

    def test_socket_paths_fit_a_unix_address_for_the_longest_name(self) -> None:
        p = vbconfig.instance_paths(self.resolve("x" * 32), Path(f"/tmp/vbridge-{2**31}/vbridge"))
        for name in ("docker_socket", "status_socket", "agent_socket", "qmp_socket", "guest_socket"):
            self.assertLessEqual(len(p[name]), vbconfig.SUN_PATH_MAX, name)


if __name__ == "__main__":
    unittest.main()
