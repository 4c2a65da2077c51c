"""The daemon's configuration: a TOML file, then command-line flags on top, into one frozen Config.

File layout (every key optional; see docs/sparrow.example.toml)::

    data_dir = "/var/lib/sparrow"
    base_iqn = "iqn.2026-11.io.sparrow"
    cluster_secret_file = "/etc/sparrow/cluster.secret"   # default: DATA_DIR/cluster.secret, made 0600

    [iscsi]
    listen = "0.0.0.0:3260"
    advertise = ["192.0.2.10"]          # HOST or HOST:PORT, one string or a list
    nop_interval = 5.0                  # seconds between NOP-In pings (RFC 7143 11.19)
    nop_timeout = 15.0                  # seconds without an answer before the connection is dropped

    [iscsi.discovery_chap]              # CHAP for SendTargets discovery sessions (with the
                                        # secret in it, the file must be mode 0600)
    user = "discovery"
    secret = "a-secret-of-12+"

    [http]
    listen = "127.0.0.1:3280"
    header_timeout = 10.0               # seconds for a whole request head (sparrow.httplimits)
    body_timeout = 30.0                 # seconds for a whole request body
    idle_timeout = 60.0                 # seconds a kept-alive connection may sit idle
    max_connections = 256               # open HTTP connections; more are closed at once
    public_metrics = false              # true: GET /metrics without the scrape token (labs
                                        # only: the metrics name volumes; sparrow.metricsauth)

    [log]
    format = "auto"                     # auto (JSON unless stdout is a TTY), json, console
    level = "info"

    allowed_backing_prefixes = ["/dev/disk/by-id/", "/srv/sparrow"]   # backing paths a volume may
                                        # use (store.backing; none by default)

    [demo_volume]                       # created at startup when missing
    name = "demo"
    size = "1GiB"

Precedence: built-in defaults < the TOML file < flags. An unknown key, a value of the wrong type or a
bad HOST:PORT is a ConfigError naming the file and key (or the flag).

Default data directory: ``/var/lib/sparrow`` when running as root (what the systemd unit's
``StateDirectory=sparrow`` creates), otherwise ``$XDG_DATA_HOME/sparrow``, i.e.
``~/.local/share/sparrow`` when XDG_DATA_HOME is unset.

Advertised portals (the TargetAddress values a SendTargets discovery returns, RFC 7143 12.7): the
``advertise`` addresses when given (a HOST without a port gets the iSCSI listen port). Otherwise the
listen address itself, except that a wildcard listen address (``0.0.0.0``, ``::``) is replaced by the
host's primary address: the local address of the default route, found by connecting (not sending on)
a UDP socket, or ``127.0.0.1`` when the host has no route. A port of 0 means "the port actually bound".
"""

from __future__ import annotations

import contextlib
import enum
import ipaddress
import os
import re
import socket
import stat
import tomllib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from frontend.target import DEFAULT_BASE_IQN, ChapSecret
from sparrow.cluster.messages import InvalidMessage, check_chap_name
from sparrow.httplimits import HttpLimits
from sparrow.privatefile import foreign_owner
from sparrow.sizes import SizeError, parse_size
from store.backing import BackingPolicy

DEFAULT_ISCSI_PORT = 3260
DEFAULT_HTTP_PORT = 3280
DEFAULT_SYSTEM_DATA_DIR = Path("/var/lib/sparrow")

#: RFC 3720 3.2.6.3.1 "iqn." names: iqn.YYYY-MM.reversed.domain[:unique]; lower case after
#: stringprep (RFC 3722). The volume name is appended as ":NAME".
_LABEL = r"[a-z0-9]([a-z0-9-]*[a-z0-9])?"
_IQN_RE = re.compile(rf"^iqn\.\d{{4}}-(0[1-9]|1[0-2])\.{_LABEL}(\.{_LABEL})*(:[a-z0-9.:-]+)?$")
_HOSTNAME_RE = re.compile(rf"^{_LABEL}(\.{_LABEL})*\.?$", re.IGNORECASE)
_WILDCARDS = frozenset({"0.0.0.0", "::", ""})

LOG_LEVELS = ("debug", "info", "warning", "error")


class ConfigError(Exception):
    """A configuration problem, one line. ``usage`` is True when a command-line flag is at fault."""

    def __init__(self, message: str, *, usage: bool = False) -> None:
        super().__init__(message)
        self.usage = usage


class LogFormat(enum.StrEnum):
    AUTO = "auto"
    JSON = "json"
    CONSOLE = "console"


@dataclass(frozen=True, slots=True)
class HostPort:
    host: str
    port: int

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


@dataclass(frozen=True, slots=True)
class DemoVolume:
    name: str
    size: int


@dataclass(frozen=True, slots=True)
class Config:
    data_dir: Path
    iscsi: HostPort = HostPort("0.0.0.0", DEFAULT_ISCSI_PORT)
    http: HostPort = HostPort("127.0.0.1", DEFAULT_HTTP_PORT)
    base_iqn: str = DEFAULT_BASE_IQN
    #: Addresses given by the operator; empty means "derive from the listen address".
    advertise: tuple[HostPort, ...] = ()
    discovery_chap: ChapSecret | None = None
    nop_interval: float = 5.0
    nop_timeout: float = 15.0
    log_format: LogFormat = LogFormat.AUTO
    log_level: str = "info"
    demo_volume: DemoVolume | None = None
    #: The cluster secret file (None: ``DATA_DIR/cluster.secret``, made on first start).
    cluster_secret_file: Path | None = None
    #: Where a volume's ``backing`` may point (store.backing); empty: no backing is allowed.
    allowed_backing: tuple[str, ...] = ()
    http_limits: HttpLimits = field(default_factory=HttpLimits)
    #: /metrics open to anyone (``--public-metrics``; sparrow.metricsauth). Default: locked.
    public_metrics: bool = False

    def advertised_portals(
        self, *, bound_port: int | None = None, primary_address: Callable[[], str] | None = None
    ) -> tuple[HostPort, ...]:
        """The portals SendTargets reports (see the module docstring for the rules).

        ``bound_port`` is the port the iSCSI listener actually got; it replaces a port of 0.
        """
        port = bound_port if bound_port is not None else self.iscsi.port
        if self.advertise:
            return tuple(HostPort(a.host, a.port or port) for a in self.advertise)
        host = self.iscsi.host
        if host in _WILDCARDS:
            host = (primary_address or host_primary_address)()
        return (HostPort(host, port),)

    def iqn_for(self, volume: str) -> str:
        return f"{self.base_iqn}:{volume}"


@dataclass(frozen=True, slots=True)
class Overrides:
    """Values given as command-line flags, still as text; None = not given."""

    data_dir: str | None = None
    iscsi: str | None = None
    http: str | None = None
    advertise: tuple[str, ...] | None = None
    base_iqn: str | None = None
    demo_volume: str | None = None
    log_format: str | None = None
    log_level: str | None = None
    allow_backing: tuple[str, ...] | None = None
    #: ``--public-metrics`` (True) or not given (None).
    public_metrics: bool | None = None


def host_primary_address() -> str:
    """The local address of the default route, or 127.0.0.1 when there is none.

    ``connect`` on a UDP socket only selects a route and a source address; nothing is sent.
    """
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect(("192.0.2.1", 9))  # TEST-NET-1 (RFC 5737): any routable address will do
            return str(s.getsockname()[0])
    except OSError:
        return "127.0.0.1"


def default_data_dir(*, euid: int | None = None, env: Mapping[str, str] | None = None) -> Path:
    """``/var/lib/sparrow`` for root, else ``$XDG_DATA_HOME/sparrow`` (default ~/.local/share/sparrow)."""
    euid = os.geteuid() if euid is None else euid
    env = os.environ if env is None else env
    if euid == 0:
        return DEFAULT_SYSTEM_DATA_DIR
    xdg = env.get("XDG_DATA_HOME")
    base = Path(xdg) if xdg and Path(xdg).is_absolute() else Path.home() / ".local" / "share"
    return base / "sparrow"


def parse_host_port(text: str, *, what: str, default_port: int | None = None) -> HostPort:
    """``HOST:PORT``, ``[IPV6]:PORT``; ``HOST`` alone when ``default_port`` is given.

    Port 0 is accepted (the kernel picks one). Raises ConfigError naming ``what``.
    """
    expected = "HOST:PORT" if default_port is None else "HOST or HOST:PORT"

    def bad(reason: str) -> ConfigError:
        return ConfigError(f"invalid address {text!r} for {what}: {reason} (expected {expected})")

    text_s = text.strip()
    port_text: str | None
    if text_s.startswith("["):
        end = text_s.find("]")
        if end < 0:
            raise bad("unclosed '['")
        host = text_s[1:end]
        rest = text_s[end + 1 :]
        if rest and not rest.startswith(":"):
            raise bad("unexpected text after ']'")
        port_text = rest[1:] if rest else None
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise bad(f"{host!r} is not an IPv6 address") from None
    elif text_s.count(":") > 1:
        raise bad("write an IPv6 address in brackets, e.g. [::1]:3260")
    elif ":" in text_s:
        host, port_text = text_s.split(":")
    else:
        host, port_text = text_s, None
    if port_text is None:
        if default_port is None:
            raise bad("missing port")
        port = default_port
    else:
        if not port_text.isdigit():
            raise bad(f"port {port_text!r} is not a number")
        port = int(port_text)
        if port > 65535:
            raise bad(f"port {port} is out of range 0-65535")
    if not text_s.startswith("[") and host != "" and not _is_ipv4(host) and not _HOSTNAME_RE.match(host):
        raise bad(f"{host!r} is not an IP address or host name")
    if host == "" and default_port is not None:
        raise bad("missing host")
    return HostPort(host or "0.0.0.0", port)


def parse_demo_volume(text: str, *, what: str) -> DemoVolume:
    """``NAME:SIZE``, e.g. ``demo:1GiB``."""
    name, sep, size = text.partition(":")
    if not sep or not name or not size:
        raise ConfigError(f"invalid demo volume {text!r} for {what}: expected NAME:SIZE, e.g. demo:1GiB")
    try:
        return DemoVolume(name, parse_size(size))
    except SizeError as e:
        raise ConfigError(f"{what}: {e}") from None


def load_config(
    path: Path | None = None,
    overrides: Overrides | None = None,
    *,
    euid: int | None = None,
    env: Mapping[str, str] | None = None,
) -> Config:
    """Defaults, then the TOML file at ``path`` (if any), then ``overrides``. Raises ConfigError."""
    overrides = overrides or Overrides()
    values: dict[str, Any] = {}
    if path is not None:
        values = _read_toml(path)
    src = str(path) if path is not None else "config"

    def from_file(key: str) -> tuple[Any, str] | None:
        return (values[key], f"{src}: {key}") if key in values else None

    def pick(key: str, flag: str, flag_value: Any) -> tuple[Any, str, bool] | None:
        if flag_value is not None:
            return flag_value, flag, True
        got = from_file(key)
        return (got[0], got[1], False) if got is not None else None

    def fail(message: str, usage: bool) -> ConfigError:
        return ConfigError(message, usage=usage)

    kwargs: dict[str, Any] = {}

    got = pick("data_dir", "--data-dir", overrides.data_dir)
    if got is not None:
        if not got[0]:
            raise fail(f"{got[1]}: the data directory must not be empty", got[2])
        kwargs["data_dir"] = Path(got[0]).expanduser()
    else:
        kwargs["data_dir"] = default_data_dir(euid=euid, env=env)

    iscsi = HostPort("0.0.0.0", DEFAULT_ISCSI_PORT)
    got = pick("iscsi.listen", "--iscsi", overrides.iscsi)
    if got is not None:
        value, what, usage = got
        with _blame(usage):
            iscsi = parse_host_port(value, what=what)
    kwargs["iscsi"] = iscsi

    got = pick("http.listen", "--http", overrides.http)
    if got is not None:
        value, what, usage = got
        with _blame(usage):
            kwargs["http"] = parse_host_port(value, what=what)

    got = pick("iscsi.advertise", "--advertise", overrides.advertise)
    if got is not None:
        value, what, usage = got
        items = (value,) if isinstance(value, str) else tuple(value)
        if not all(isinstance(v, str) for v in items):
            raise fail(f"{what}: expected a string or a list of strings", usage)
        advertised = []
        for item in items:
            with _blame(usage):
                hp = parse_host_port(item, what=what, default_port=0)
            if hp.host in _WILDCARDS:
                message = f"{what}: {item!r} is a wildcard; advertise an address initiators can reach"
                raise fail(message, usage)
            advertised.append(hp)
        kwargs["advertise"] = tuple(advertised)

    got = pick("base_iqn", "--base-iqn", overrides.base_iqn)
    if got is not None:
        value, what, usage = got
        if not _IQN_RE.match(value):
            raise fail(
                f"{what}: {value!r} is not a valid iSCSI qualified name "
                "(expected lower-case iqn.YYYY-MM.reversed.domain, e.g. iqn.2026-11.io.sparrow)",
                usage,
            )
        kwargs["base_iqn"] = value

    user = from_file("iscsi.discovery_chap.user")
    secret = from_file("iscsi.discovery_chap.secret")
    if (user is None) != (secret is None):
        raise fail(f"{src}: [iscsi.discovery_chap] needs both user and secret", False)
    if user is not None and secret is not None:
        if not user[0] or not secret[0]:
            raise fail(f"{src}: [iscsi.discovery_chap] user and secret must not be empty", False)
        try:
            check_chap_name("user", user[0])
        except InvalidMessage as e:
            raise fail(f"{src}: [iscsi.discovery_chap] {e}", False) from None
        kwargs["discovery_chap"] = ChapSecret(user[0], secret[0])

    for key, name in (("iscsi.nop_interval", "nop_interval"), ("iscsi.nop_timeout", "nop_timeout")):
        fgot = from_file(key)
        if fgot is not None:
            if fgot[0] <= 0:
                raise fail(f"{fgot[1]}: must be greater than zero", False)
            kwargs[name] = float(fgot[0])

    limits: dict[str, Any] = {}
    for key in ("header_timeout", "body_timeout", "idle_timeout", "max_connections"):
        fgot = from_file(f"http.{key}")
        if fgot is not None:
            limits[key] = fgot[0]
    if limits:
        try:
            kwargs["http_limits"] = HttpLimits(**limits)
        except ValueError as e:
            raise fail(f"{src}: [http] {e}", False) from None

    got = pick("http.public_metrics", "--public-metrics", overrides.public_metrics)
    if got is not None:
        kwargs["public_metrics"] = bool(got[0])

    got = pick("log.format", "--log-format", overrides.log_format)
    if got is not None:
        value, what, usage = got
        try:
            kwargs["log_format"] = LogFormat(value)
        except ValueError:
            choices = ", ".join(f.value for f in LogFormat)
            raise fail(f"{what}: unknown log format {value!r} (choose from {choices})", usage) from None

    got = pick("log.level", "--log-level", overrides.log_level)
    if got is not None:
        value, what, usage = got
        if value.lower() not in LOG_LEVELS:
            raise fail(f"{what}: unknown log level {value!r} (choose from {', '.join(LOG_LEVELS)})", usage)
        kwargs["log_level"] = value.lower()

    got = pick("allowed_backing_prefixes", "--allow-backing", overrides.allow_backing)
    if got is not None:
        value, what, usage = got
        if not all(isinstance(v, str) for v in value):
            raise fail(f"{what}: expected a list of absolute paths", usage)
        try:
            kwargs["allowed_backing"] = BackingPolicy.of(value).prefixes
        except ValueError as e:
            raise fail(f"{what}: {e}", usage) from None

    if overrides.demo_volume is not None:
        with _blame(True):
            kwargs["demo_volume"] = parse_demo_volume(overrides.demo_volume, what="--demo-volume")
    elif "demo_volume.name" in values or "demo_volume.size" in values:
        if "demo_volume.name" not in values or "demo_volume.size" not in values:
            raise fail(f"{src}: [demo_volume] needs both name and size", False)
        try:
            size = parse_size(values["demo_volume.size"])
        except SizeError as e:
            raise fail(f"{src}: demo_volume.size: {e}", False) from None
        kwargs["demo_volume"] = DemoVolume(values["demo_volume.name"], size)

    secret_file = from_file("cluster_secret_file")
    if secret_file is not None:
        if not secret_file[0]:
            raise fail(f"{secret_file[1]}: must not be empty", False)
        kwargs["cluster_secret_file"] = Path(secret_file[0]).expanduser()

    return Config(**kwargs)


# --- the TOML file -----------------------------------------------------------------------------

#: Allowed keys and their TOML types. A nested dict is a table.
_SCHEMA: dict[str, Any] = {
    "data_dir": str,
    "base_iqn": str,
    "cluster_secret_file": str,
    "allowed_backing_prefixes": list,
    "iscsi": {
        "listen": str,
        "advertise": (str, list),
        "nop_interval": (int, float),
        "nop_timeout": (int, float),
        "discovery_chap": {"user": str, "secret": str},
    },
    "http": {
        "listen": str,
        "header_timeout": (int, float),
        "body_timeout": (int, float),
        "idle_timeout": (int, float),
        "max_connections": int,
        "public_metrics": bool,
    },
    "log": {"format": str, "level": str},
    "demo_volume": {"name": str, "size": (str, int)},
}

#: The one secret a config file may hold: the file must then be private (mode 0600).
SECRET_KEY = "iscsi.discovery_chap.secret"

_TYPE_NAMES = {str: "a string", int: "an integer", float: "a number", list: "a list", bool: "true or false"}


def _read_toml(path: Path) -> dict[str, Any]:
    """The file's values flattened to dotted keys, checked against _SCHEMA."""
    try:
        with path.open("rb") as f:
            data = tomllib.load(f)
            st = os.fstat(f.fileno())
    except OSError as e:
        raise ConfigError(f"cannot read config file {path}: {e.strerror or e}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: invalid TOML: {e}") from None
    flat: dict[str, Any] = {}
    _flatten(path, data, _SCHEMA, "", flat)
    mode = stat.S_IMODE(st.st_mode)
    if SECRET_KEY in flat and (owner := foreign_owner(st)) is not None:
        # The rule of the key files (sparrow.privatefile): a secret no other user may read or change.
        raise ConfigError(f"{path} holds {SECRET_KEY} and belongs to another user (uid {owner}); chown it")
    if SECRET_KEY in flat and mode & 0o077:
        raise ConfigError(
            f"{path} holds {SECRET_KEY} and is accessible by group or others (mode {mode:04o}); chmod 600 it"
        )
    return flat


def _flatten(
    path: Path, data: Mapping[str, Any], schema: Mapping[str, Any], prefix: str, out: dict[str, Any]
) -> None:
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if key not in schema:
            where = f"[{prefix[:-1]}]" if prefix else "the top level"
            known = ", ".join(schema)
            raise ConfigError(f"{path}: unknown key {dotted!r} (known keys at {where}: {known})")
        expected = schema[key]
        if isinstance(expected, dict):
            if not isinstance(value, dict):
                raise ConfigError(f"{path}: {dotted} must be a table ([{dotted}])")
            _flatten(path, value, expected, f"{dotted}.", out)
            continue
        types = expected if isinstance(expected, tuple) else (expected,)
        # bool is an int subclass in Python; TOML true/false is never a valid number here.
        if (isinstance(value, bool) and bool not in types) or not isinstance(value, types):
            names = " or ".join(_TYPE_NAMES.get(t, t.__name__) for t in types)
            raise ConfigError(f"{path}: {dotted} must be {names}, not {type(value).__name__}")
        out[dotted] = value


@contextlib.contextmanager
def _blame(usage: bool) -> Iterator[None]:
    """Re-raise a ConfigError as a usage error (a flag) or not (the file)."""
    try:
        yield
    except ConfigError as e:
        raise ConfigError(str(e), usage=usage) from None


def _is_ipv4(host: str) -> bool:
    try:
        ipaddress.IPv4Address(host)
    except ValueError:
        return False
    return True


__all__ = [
    "LOG_LEVELS",
    "Config",
    "ConfigError",
    "DemoVolume",
    "HostPort",
    "LogFormat",
    "Overrides",
    "default_data_dir",
    "host_primary_address",
    "load_config",
    "parse_demo_volume",
    "parse_host_port",
]
