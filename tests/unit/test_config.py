"""sparrow.config: defaults < TOML file < flags, and one clear error for every bad input."""

from __future__ import annotations

from pathlib import Path

import pytest

from frontend.target import ChapSecret
from sparrow.config import (
    Config,
    ConfigError,
    DemoVolume,
    HostPort,
    LogFormat,
    Overrides,
    default_data_dir,
    host_primary_address,
    load_config,
    parse_host_port,
)
from tests.unit.test_privatefile import give_away

MiB = 1024**2


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "sparrow.toml"
    path.write_text(text)
    path.chmod(0o600)
    return path


FULL = """
data_dir = "/srv/sparrow"
base_iqn = "iqn.2030-01.com.example"

[iscsi]
listen = "10.0.0.5:3261"
advertise = ["10.0.0.5", "192.0.2.7:3300"]
nop_interval = 2
nop_timeout = 7.5

[iscsi.discovery_chap]
user = "disc"
secret = "discsecret12"

[http]
listen = "127.0.0.1:9000"

[log]
format = "json"
level = "DEBUG"

[demo_volume]
name = "demo"
size = "64MiB"
"""


def test_defaults_without_file(tmp_path: Path) -> None:
    config = load_config(None, euid=1000, env={"XDG_DATA_HOME": str(tmp_path)})
    assert config.data_dir == tmp_path / "sparrow"
    assert config.iscsi == HostPort("0.0.0.0", 3260)
    assert config.http == HostPort("127.0.0.1", 3280)
    assert config.base_iqn == "iqn.2026-11.io.sparrow"
    assert config.advertise == ()
    assert config.discovery_chap is None
    assert config.log_format is LogFormat.AUTO
    assert config.log_level == "info"
    assert config.demo_volume is None


def test_default_data_dir_for_root_and_users(tmp_path: Path) -> None:
    assert default_data_dir(euid=0, env={}) == Path("/var/lib/sparrow")
    assert default_data_dir(euid=1000, env={}) == Path.home() / ".local/share/sparrow"
    assert default_data_dir(euid=1000, env={"XDG_DATA_HOME": str(tmp_path)}) == tmp_path / "sparrow"
    # a relative XDG_DATA_HOME is invalid per the XDG spec and ignored
    assert default_data_dir(euid=1000, env={"XDG_DATA_HOME": "rel"}) == Path.home() / ".local/share/sparrow"


def test_full_file(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, FULL))
    assert config == Config(
        data_dir=Path("/srv/sparrow"),
        iscsi=HostPort("10.0.0.5", 3261),
        http=HostPort("127.0.0.1", 9000),
        base_iqn="iqn.2030-01.com.example",
        advertise=(HostPort("10.0.0.5", 0), HostPort("192.0.2.7", 3300)),
        discovery_chap=ChapSecret("disc", "discsecret12"),
        nop_interval=2.0,
        nop_timeout=7.5,
        log_format=LogFormat.JSON,
        log_level="debug",
        demo_volume=DemoVolume("demo", 64 * MiB),
    )
    # an advertised HOST without a port gets the listen port
    assert config.advertised_portals() == (HostPort("10.0.0.5", 3261), HostPort("192.0.2.7", 3300))
    assert config.iqn_for("vol1") == "iqn.2030-01.com.example:vol1"


def test_flags_override_the_file(tmp_path: Path) -> None:
    overrides = Overrides(
        data_dir="~/elsewhere",
        iscsi="127.0.0.1:4000",
        http="[::1]:4001",
        advertise=("198.51.100.1",),
        base_iqn="iqn.2031-02.org.test",
        demo_volume="other:1G",
        log_format="console",
        log_level="warning",
    )
    config = load_config(write(tmp_path, FULL), overrides)
    assert config.data_dir == Path.home() / "elsewhere"
    assert config.iscsi == HostPort("127.0.0.1", 4000)
    assert config.http == HostPort("::1", 4001)
    assert config.advertised_portals() == (HostPort("198.51.100.1", 4000),)
    assert config.base_iqn == "iqn.2031-02.org.test"
    assert config.demo_volume == DemoVolume("other", 1024**3)
    assert config.log_format is LogFormat.CONSOLE
    assert config.log_level == "warning"
    # what no flag touched still comes from the file
    assert config.discovery_chap == ChapSecret("disc", "discsecret12")
    assert config.nop_timeout == 7.5


def test_flag_listen_port_feeds_file_advertise_without_port(tmp_path: Path) -> None:
    path = write(tmp_path, '[iscsi]\nadvertise = "10.1.1.1"\n')
    config = load_config(path, Overrides(iscsi="0.0.0.0:5000"))
    assert config.advertised_portals() == (HostPort("10.1.1.1", 5000),)


def test_wildcard_listen_advertises_primary_address() -> None:
    config = Config(data_dir=Path("/x"), iscsi=HostPort("0.0.0.0", 3260))
    assert config.advertised_portals(primary_address=lambda: "192.0.2.44") == (HostPort("192.0.2.44", 3260),)
    v6 = Config(data_dir=Path("/x"), iscsi=HostPort("::", 3260))
    assert v6.advertised_portals(primary_address=lambda: "192.0.2.44") == (HostPort("192.0.2.44", 3260),)


def test_specific_listen_address_is_advertised_as_is() -> None:
    config = Config(data_dir=Path("/x"), iscsi=HostPort("127.0.0.1", 3999))
    assert config.advertised_portals(primary_address=lambda: "192.0.2.44") == (HostPort("127.0.0.1", 3999),)


def test_port_zero_is_replaced_by_the_bound_port() -> None:
    config = Config(data_dir=Path("/x"), iscsi=HostPort("127.0.0.1", 0))
    assert config.advertised_portals(bound_port=40123) == (HostPort("127.0.0.1", 40123),)


def test_host_primary_address_is_an_address() -> None:
    import ipaddress

    ipaddress.IPv4Address(host_primary_address())  # no exception: a real dotted quad (or 127.0.0.1)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("0.0.0.0:3260", HostPort("0.0.0.0", 3260)),
        ("127.0.0.1:0", HostPort("127.0.0.1", 0)),
        ("[::1]:3260", HostPort("::1", 3260)),
        ("[::]:3260", HostPort("::", 3260)),
        ("localhost:80", HostPort("localhost", 80)),
        ("storage-1.example.com:3260", HostPort("storage-1.example.com", 3260)),
        (":3260", HostPort("0.0.0.0", 3260)),
        ("10.0.0.1:65535", HostPort("10.0.0.1", 65535)),
    ],
)
def test_good_host_port(text: str, expected: HostPort) -> None:
    assert parse_host_port(text, what="--iscsi") == expected


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("127.0.0.1", "missing port"),
        ("127.0.0.1:", "is not a number"),
        ("127.0.0.1:http", "is not a number"),
        ("127.0.0.1:65536", "out of range"),
        ("127.0.0.1:-1", "is not a number"),
        ("::1:3260", "in brackets"),
        ("[::1:3260", "unclosed"),
        ("[::1]3260", "after ']'"),
        ("[nothost]:3260", "not an IPv6 address"),
        ("bad_host!:3260", "not an IP address or host name"),
        ("", "missing port"),
    ],
)
def test_bad_host_port(text: str, fragment: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_host_port(text, what="--iscsi")
    message = str(info.value)
    assert fragment in message
    assert "--iscsi" in message and repr(text) in message
    assert "\n" not in message


def test_bad_flag_is_a_usage_error() -> None:
    with pytest.raises(ConfigError, match="invalid address 'nope' for --http") as info:
        load_config(None, Overrides(http="nope"))
    assert info.value.usage is True


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ('[iscsi]\nlisten = "1.2.3.4:99999"\n', "out of range"),
        ('[iscsi]\nlisten = "1.2.3.4"\n', "missing port"),
        ("bogus = 1\n", "unknown key 'bogus'"),
        ('[iscsi]\nlisen = "0.0.0.0:3260"\n', "unknown key 'iscsi.lisen'"),
        ('[iscsi.discovery_chap]\nuser = "u"\n', "needs both user and secret"),
        ('[iscsi.discovery_chap]\nuser = "u"\nsecret = ""\n', "must not be empty"),
        ('[iscsi.discovery_chap]\nuser = "u\\u0000x"\nsecret = "s12345678901"\n', "no control characters"),
        ("[iscsi]\nnop_interval = 0\n", "greater than zero"),
        ('[iscsi]\nnop_interval = "5"\n', "must be an integer or a number"),
        ("[iscsi]\nnop_timeout = true\n", "must be an integer or a number"),
        ('[iscsi]\nadvertise = "0.0.0.0"\n', "wildcard"),
        ("[iscsi]\nadvertise = [1]\n", "list of strings"),
        ('iscsi = "0.0.0.0:3260"\n', "must be a table"),
        ("[http]\nlisten = 3280\n", "must be a string"),
        ('[log]\nformat = "xml"\n', "unknown log format 'xml'"),
        ('[log]\nlevel = "loud"\n', "unknown log level 'loud'"),
        ('base_iqn = "IQN.2026-11.IO.SPARROW"\n', "not a valid iSCSI qualified name"),
        ('base_iqn = "iqn.2026-13.io.sparrow"\n', "not a valid iSCSI qualified name"),
        ('[demo_volume]\nname = "demo"\n', "needs both name and size"),
        ('[demo_volume]\nname = "demo"\nsize = "lots"\n', "demo_volume.size: invalid size 'lots'"),
        ('data_dir = ""\n', "must not be empty"),
        ("[iscsi\n", "invalid TOML"),
    ],
)
def test_bad_file(tmp_path: Path, text: str, fragment: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert fragment in message
    assert str(path) in message  # the error names the file
    assert "\n" not in message
    assert info.value.usage is False


def test_unknown_key_lists_the_known_ones(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"known keys at \[http\]: listen"):
        load_config(write(tmp_path, "[http]\nport = 1\n"))


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"cannot read config file .*nope\.toml: No such file"):
        load_config(tmp_path / "nope.toml")


@pytest.mark.parametrize(
    ("demo", "fragment"),
    [
        ("demo", "expected NAME:SIZE"),
        ("demo:", "expected NAME:SIZE"),
        (":1G", "expected NAME:SIZE"),
        ("demo:0", "greater than zero"),
        ("demo:1GB", "ambiguous"),
    ],
)
def test_bad_demo_volume_flag(demo: str, fragment: str) -> None:
    with pytest.raises(ConfigError, match=fragment) as info:
        load_config(None, Overrides(demo_volume=demo))
    assert info.value.usage is True
    assert "--demo-volume" in str(info.value)


def test_example_config_file_loads() -> None:
    """docs/sparrow.example.toml is documentation that must stay loadable."""
    path = Path(__file__).resolve().parents[2] / "docs" / "sparrow.example.toml"
    config = load_config(path)
    assert config.iscsi == HostPort("0.0.0.0", 3260)
    assert config.http == HostPort("127.0.0.1", 3280)
    assert config.data_dir == Path("/var/lib/sparrow")


def test_the_cluster_secret_file_key(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, 'cluster_secret_file = "/etc/sparrow/cluster.secret"\n'))
    assert config.cluster_secret_file == Path("/etc/sparrow/cluster.secret")
    assert load_config(write(tmp_path, "")).cluster_secret_file is None
    with pytest.raises(ConfigError, match="cluster_secret_file: must not be empty"):
        load_config(write(tmp_path, 'cluster_secret_file = ""\n'))


def test_serve_makes_its_secret_once_and_reuses_it(tmp_path: Path) -> None:
    from sparrow.clustersecret import serve_secret

    first = serve_secret(tmp_path, None)
    assert (tmp_path / "cluster.secret").stat().st_mode & 0o777 == 0o600
    assert serve_secret(tmp_path, None) == first
    with pytest.raises(ConfigError, match="does not exist"):
        serve_secret(tmp_path, tmp_path / "missing.secret")


def test_allowed_backing_prefixes_from_the_file_and_the_flag(tmp_path: Path) -> None:
    path = tmp_path / "sparrow.toml"
    path.write_text('allowed_backing_prefixes = ["/dev/disk/by-id/", "/srv//disks/../vm"]\n')
    assert load_config(path).allowed_backing == ("/dev/disk/by-id", "/srv/vm")
    assert load_config(path, Overrides(allow_backing=("/mnt",))).allowed_backing == ("/mnt",)
    assert load_config(None).allowed_backing == ()  # none by default
    with pytest.raises(ConfigError, match="must be an absolute path") as info:
        load_config(None, Overrides(allow_backing=("disks",)))
    assert info.value.usage
    path.write_text('allowed_backing_prefixes = "/dev"\n')
    with pytest.raises(ConfigError, match="must be a list"):
        load_config(path)


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o644])
def test_a_file_holding_the_discovery_secret_must_be_private(tmp_path: Path, mode: int) -> None:
    path = write(tmp_path, '[iscsi.discovery_chap]\nuser = "u"\nsecret = "s12345678901"\n')
    path.chmod(mode)
    with pytest.raises(ConfigError, match=f"iscsi.discovery_chap.secret .*mode {mode:04o}.*chmod 600"):
        load_config(path)
    path.write_text('[iscsi]\nlisten = "127.0.0.1:3260"\n')  # no secret: any mode
    load_config(path)


def test_a_file_holding_the_discovery_secret_that_another_user_owns_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write(tmp_path, '[iscsi.discovery_chap]\nuser = "u"\nsecret = "s12345678901"\n')
    load_config(path)  # ours, 0600: taken
    owner = give_away(path, monkeypatch)
    with pytest.raises(ConfigError, match=rf"secret and belongs to another user \(uid {owner}\)"):
        load_config(path)
