"""vbridge's configuration: built-in defaults < TOML file < command-line flags.

The file is `--config FILE`, else `$XDG_CONFIG_HOME/vbridge/<instance>.toml` (default
`~/.config/vbridge/<instance>.toml`) when it exists. Keys are flat (no tables); `KEYS` below is the whole
list. A list given on the command line replaces the file's list for that key. Any unknown key, wrong type or
bad value is a ConfigError whose text names the file and line (or the flag), the key and what is allowed.

Also here: the paths an instance uses (`instance_paths`), so that instances can be checked for collisions
without starting anything. Reading the file needs Python 3.11 (`tomllib`); the rest is 3.9+.
"""

from __future__ import annotations

import difflib
import ipaddress
import json
import os
import re
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from vmcommon import runtime_root

NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,31}")
PUBLISH_RE = re.compile(r"(?:(?P<addr>\[[0-9A-Fa-f:.]+\]|[0-9.]+):)?(?P<host>\d{1,5}):(?P<guest>\d{1,5})"
                        r"(?:/(?P<proto>tcp|udp))?")
PORT_MAP_RE = re.compile(r"(?P<guest>\d{1,5})=(?P<host>\d{1,5})")
SIZE_RE = re.compile(r"(?P<n>\d+)\s*(?P<unit>[MG]i?B?|[MG])?", re.IGNORECASE)
SUN_PATH_MAX = 107


class ConfigError(Exception):
    """One line for the user: '<where>: <what>'."""


def _port(text: str) -> bool:
    return text.isdigit() and 1 <= int(text) <= 65535


def _check_publish(v: str) -> Optional[str]:
    m = PUBLISH_RE.fullmatch(v)
    if not m or not _port(m["host"]) or not _port(m["guest"]):
        return "[ADDR:]HOSTPORT:GUESTPORT[/udp] with ports 1-65535, e.g. \"8080:80\" or \"127.0.0.1:5353:53/udp\""
    if m["addr"]:
        try:
            ipaddress.ip_address(m["addr"].strip("[]"))
        except ValueError:
            return f"an IP address before the ports, not {m['addr']!r}"
    return None


def _check_port_map(v: str) -> Optional[str]:
    m = PORT_MAP_RE.fullmatch(v)
    if not m or not _port(m["guest"]) or not _port(m["host"]):
        return "GUESTPORT=HOSTPORT with ports 1-65535, e.g. \"80=8080\""
    return None


def _check_forward(v: str) -> Optional[str]:
    host, sep, guest = v.partition("=")
    if not sep or not host.startswith("/") or not guest:
        return "HOST_PATH=GUEST_TARGET with an absolute host path, e.g. \"/tmp/pg.sock=/run/postgresql/.s.PGSQL.5432\""
    if len(host) > SUN_PATH_MAX:
        return f"a host socket path of at most {SUN_PATH_MAX} bytes"
    return None


def _check_share(v: str) -> Optional[str]:
    host, _, guest = v.partition(":")
    if not host:
        return "HOST_DIR[:GUEST_DIR], e.g. \"/home/me/src\" or \"/home/me/src:/src\""
    if guest and (not guest.startswith("/") or any(c in guest for c in " ,:\t\n")):
        return "an absolute guest path without spaces, ',' or ':' after the ':'"
    if "," in host:
        return "a host path without ',' (QEMU cannot take it)"
    return None


def _check_socket_path(v: str) -> Optional[str]:
    if not v.startswith("/"):
        return "an absolute path"
    if len(v) > SUN_PATH_MAX:
        return f"a path of at most {SUN_PATH_MAX} bytes (unix socket limit)"
    return None


def _check_context(v: str) -> Optional[str]:
    return None if re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.+-]*", v) else "a docker context name: letters, digits, '.', '_', '+', '-'"


def _check_ip(version: int) -> Callable[[str], Optional[str]]:
    def check(v: str) -> Optional[str]:
        try:
            if ipaddress.ip_address(v).version == version:
                return None
        except ValueError:
            pass
        return f"an IPv{version} address"
    return check


def _no_comma_space(v: str) -> Optional[str]:
    return "an argument without ',' or spaces (it travels on the guest kernel command line)" if re.search(r"[,\s]", v) else None


@dataclass(frozen=True)
class Key:
    name: str
    kind: str  # str | int | float | bool | size | list
    default: Any
    help: str
    choices: tuple = ()
    lo: Optional[float] = None
    hi: Optional[float] = None
    check: Optional[Callable[[str], Optional[str]]] = None  # for str values and list items

    @property
    def flag(self) -> str:
        return "--" + {"shares": "share", "publish": "publish", "forwards": "forward", "port_map": "port-map",
                       "host_args": "host-arg", "guest_args": "guest-arg"}.get(self.name, self.name.replace("_", "-"))

    def allowed(self) -> str:
        if self.choices:
            return "one of " + ", ".join(f'"{c}"' for c in self.choices)
        if self.kind == "int":
            return f"an integer {int(self.lo)}-{int(self.hi)}"
        if self.kind == "float":
            return f"a number of seconds {self.lo:g}-{self.hi:g}"
        if self.kind == "bool":
            return "true or false"
        if self.kind == "size":
            return f"MiB as an integer {int(self.lo)}-{int(self.hi)}, or a string such as \"2G\" or \"1536M\""
        if self.kind == "list":
            return "a list of strings"
        return "a string"


KEYS: tuple[Key, ...] = (
    Key("mode", "str", "vm", "vm: a QEMU guest; local: dockerd + guest agent in namespaces on this kernel",
        choices=("vm", "local")),
    Key("accel", "str", "auto", "QEMU accelerator: auto probes KVM with a short boot, else TCG",
        choices=("auto", "kvm", "tcg")),
    Key("transport", "str", "serial", "VM channel: virtio-serial behind a unix socket, or vsock (opt-in: needs "
        "/dev/vhost-vsock)", choices=("serial", "vsock")),
    Key("vsock_cid", "int", None, "guest CID with transport vsock (default 3 for instance default, else derived "
        "from the instance name)", lo=3, hi=0xFFFFFFFE),
    Key("cpus", "int", 1, "vCPUs", lo=1, hi=64),
    Key("memory", "size", 2048, "guest memory in MiB (or \"2G\")", lo=256, hi=1 << 20),
    Key("boot_timeout", "float", 180.0, "seconds for the guest (and the bridge) to answer; then it is stopped",
        lo=1, hi=3600),
    Key("storage_driver", "str", "overlay2", "dockerd storage driver in the VM", choices=("overlay2", "vfs")),
    Key("shares", "list", [], "host folders shared into the VM over 9p, HOST[:GUEST], with file events",
        check=_check_share),
    Key("publish", "list", [], "static port forwards [ADDR:]HOSTPORT:GUESTPORT[/udp]", check=_check_publish),
    Key("port_map", "list", [], "followed guest ports bound on another host port, GUEST=HOST",
        check=_check_port_map),
    Key("forwards", "list", [], "unix socket forwards HOST_PATH=GUEST_TARGET", check=_check_forward),
    Key("follow_ports", "bool", True, "forward the ports the guest listens on"),
    Key("shared_memory", "bool", True, "the agents share a 128 MiB tmpfs file (mode vm: behind an ivshmem "
        "device) and pass stream bytes by reference instead of copying them through the channel"),
    Key("bind_address", "str", "127.0.0.1", "IPv4 address followed ports bind on", check=_check_ip(4)),
    Key("bind_address6", "str", "::1", "IPv6 address followed ports bind on", check=_check_ip(6)),
    Key("docker_socket", "str", None, "host path of the bridged docker.sock (default <runtime>/<instance>/host/"
        "docker.sock)", check=_check_socket_path),
    Key("docker_context", "str", None, "docker CLI context (default vbridge, or vbridge-<instance>)",
        check=_check_context),
    Key("log_level", "str", "info", "host agent log level", choices=("debug", "info", "warn", "error")),
    Key("host_args", "list", [], "extra vbridge-host flags"),
    Key("guest_args", "list", [], "extra vbridge-guest flags (mode vm)", check=_no_comma_space),
)
BY_NAME = {k.name: k for k in KEYS}


def _type_name(v: Any) -> str:
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "a list",
            dict: "a table"}.get(type(v), type(v).__name__)


def check_value(key: Key, value: Any, from_cli: bool = False) -> Any:
    """The normalized value, or ConfigError('key "K" must be ..., not ...'). CLI values arrive as strings."""
    def bad(detail: str = "") -> ConfigError:
        try:
            shown = json.dumps(value)
        except TypeError:  # TOML dates and times
            shown = str(value)
        return ConfigError(f'key "{key.name}" must be {detail or key.allowed()}, not {shown}')

    if key.kind == "list":
        if from_cli:
            value = list(value)
        if not isinstance(value, list) or not all(isinstance(x, str) for x in value):
            raise bad()
        for item in value:
            why = key.check(item) if key.check else None
            if why:
                raise ConfigError(f'key "{key.name}": "{item}" is not {why}')
        return list(value)
    if key.kind == "bool":
        if from_cli and isinstance(value, str):
            value = {"true": True, "false": False}.get(value.lower(), value)
        if not isinstance(value, bool):
            raise bad()
        return value
    if key.kind in ("int", "float"):
        if from_cli and isinstance(value, str):
            try:
                value = int(value) if key.kind == "int" else float(value)
            except ValueError:
                raise bad() from None
        ok_types = (int,) if key.kind == "int" else (int, float)
        if isinstance(value, bool) or not isinstance(value, ok_types) or not key.lo <= value <= key.hi:
            raise bad()
        return float(value) if key.kind == "float" else value
    if key.kind == "size":
        mib = None
        if isinstance(value, int) and not isinstance(value, bool):
            mib = value
        elif isinstance(value, str):
            m = SIZE_RE.fullmatch(value.strip())
            if m:
                mib = int(m["n"]) << (10 if (m["unit"] or "M")[0].upper() == "G" else 0)
        if mib is None or not key.lo <= mib <= key.hi:
            raise bad()
        return mib
    # str
    if not isinstance(value, str):
        raise bad()
    if key.choices and value not in key.choices:
        raise bad()
    why = key.check(value) if key.check else None
    if why:
        raise bad(why)
    return value


def default_config_path(instance: str) -> Path:
    base = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return Path(base) / "vbridge" / f"{instance}.toml"


def display(path: Path) -> str:
    home = os.path.expanduser("~")
    text = str(path)
    return "~" + text[len(home):] if home not in ("", "/") and text.startswith(home + "/") else text


def _line_of(text: str, key: str) -> Optional[int]:
    k = re.escape(key)
    pattern = re.compile(rf"^\s*(?:(?:{k}|\"{k}\"|'{k}')\s*[=.]|\[+\s*{k}\s*[\].])")
    for n, line in enumerate(text.splitlines(), 1):
        if pattern.match(line):
            return n
    return None


def load_file(path: Path) -> dict:
    """The file's keys, checked and normalized. Raises ConfigError naming the file (and line)."""
    where = display(path)
    try:
        import tomllib
    except ImportError:
        raise ConfigError(f"{where}: reading TOML needs Python 3.11 or newer (tomllib)") from None
    try:
        text = path.read_text()
    except OSError as e:
        raise ConfigError(f"{where}: cannot read it: {e.strerror}") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{where}: not valid TOML: {e}") from None
    out = {}
    for name, value in data.items():
        line = _line_of(text, name)
        at = f"{where}: line {line}" if line else where
        key = BY_NAME.get(name)
        if key is None:
            near = difflib.get_close_matches(name, BY_NAME, 1)
            hint = f'did you mean "{near[0]}"? ' if near else ""
            raise ConfigError(f'{at}: key "{name}" is not known ({hint}known: {", ".join(BY_NAME)})')
        try:
            out[name] = check_value(key, value)
        except ConfigError as e:
            raise ConfigError(f"{at}: {e}") from None
    return out


@dataclass
class Config:
    instance: str
    file: Optional[Path]
    values: dict = field(default_factory=dict)
    sources: dict = field(default_factory=dict)

    def __getattr__(self, name: str) -> Any:
        try:
            return self.__dict__["values"][name]
        except KeyError:
            raise AttributeError(name) from None


def resolve(instance: str, config_file: Optional[str], cli: dict, env: Optional[dict] = None) -> Config:
    """Merges defaults < file < CLI. `cli` maps key names to raw flag values (absent or None: not given)."""
    env = os.environ if env is None else env
    if not NAME_RE.fullmatch(instance):
        raise ConfigError(f"--instance {instance!r}: use up to 32 letters, digits, '.', '_' or '-', "
                          "starting with a letter or digit")
    cfg = Config(instance, None)
    for key in KEYS:
        cfg.values[key.name] = list(key.default) if isinstance(key.default, list) else key.default
        cfg.sources[key.name] = "default"
    if env.get("VBRIDGE_MODE"):
        try:
            cfg.values["mode"] = check_value(BY_NAME["mode"], env["VBRIDGE_MODE"], from_cli=True)
        except ConfigError as e:
            raise ConfigError(f"environment VBRIDGE_MODE: {e}") from None
        cfg.sources["mode"] = "env VBRIDGE_MODE"
    if config_file:
        path = Path(config_file).expanduser()
        if not path.is_file():
            raise ConfigError(f"--config {config_file}: no such file")
    else:
        path = default_config_path(instance)
        path = path if path.is_file() else None
    if path:
        cfg.file = path
        for name, value in load_file(path).items():
            cfg.values[name] = value
            cfg.sources[name] = display(path)
    for name, raw in cli.items():
        if raw is None or (isinstance(raw, list) and not raw):
            continue
        key = BY_NAME[name]
        try:
            cfg.values[name] = check_value(key, raw, from_cli=True)
        except ConfigError as e:
            raise ConfigError(f"{key.flag}: {e}") from None
        cfg.sources[name] = key.flag
    if cfg.values["vsock_cid"] is None:
        cfg.values["vsock_cid"] = derived_cid(instance)
    return cfg


def derived_cid(instance: str) -> int:
    """3 for the default instance, else a stable CID per name, so two vsock instances do not collide."""
    return 3 if instance == "default" else 1024 + zlib.crc32(instance.encode()) % 1_000_000


def instance_paths(cfg: Config, runtime: Optional[Path] = None) -> dict:
    """Every path and name an instance owns; two instances must share none of them."""
    d = (runtime or runtime_root()) / cfg.instance
    host = d / "host"
    return {
        "runtime_dir": str(d),
        "host_runtime_dir": str(host),
        "docker_socket": cfg.values.get("docker_socket") or str(host / "docker.sock"),
        "status_socket": str(host / "status.sock"),
        "docker_context": cfg.values.get("docker_context") or
        ("vbridge" if cfg.instance == "default" else f"vbridge-{cfg.instance}"),
        "agent_socket": str(d / "agent.sock"),  # QEMU's virtio-serial chardev
        "qmp_socket": str(d / "qmp.sock"),
        "serial_log": str(d / "serial.log"),
        "guest_socket": str(d / "guest" / "guest.sock"),  # mode local
        "qemu_name": f"vbridge-{cfg.instance}",
        "vsock_cid": cfg.values.get("vsock_cid") or derived_cid(cfg.instance),
    }
