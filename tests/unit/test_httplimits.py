"""sparrow.httplimits.HttpLimits and its ``[http]`` keys in the TOML config."""

from __future__ import annotations

from pathlib import Path

import pytest

from sparrow.config import ConfigError, load_config
from sparrow.httplimits import HttpLimits


def test_defaults_bound_everything() -> None:
    limits = HttpLimits()
    assert (limits.header_timeout, limits.body_timeout, limits.idle_timeout) == (10.0, 30.0, 60.0)
    assert limits.max_connections == 256


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"header_timeout": 0}, "header_timeout must be greater than zero"),
        ({"body_timeout": float("inf")}, "body_timeout must be a number of seconds"),
        ({"max_connections": 0}, "max_connections must be at least 1"),
        ({"max_connections": True}, "max_connections must be an integer"),
        ({"header_timeout": 20.0, "idle_timeout": 15.0}, "idle_timeout must be at least header_timeout"),
    ],
)
def test_nonsense_is_refused(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        HttpLimits(**kwargs)  # type: ignore[arg-type]


def test_the_config_file_sets_them(tmp_path: Path) -> None:
    path = tmp_path / "s.toml"
    path.write_text("[http]\nheader_timeout = 2\nmax_connections = 50\n")
    limits = load_config(path, env={}, euid=1000).http_limits
    assert limits == HttpLimits(header_timeout=2.0, max_connections=50)
    assert load_config(None, env={}, euid=1000).http_limits == HttpLimits()


def test_a_bad_value_in_the_file_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "s.toml"
    path.write_text("[http]\nbody_timeout = -1\n")
    with pytest.raises(ConfigError, match=r"s\.toml: \[http\] body_timeout must be greater than zero"):
        load_config(path, env={}, euid=1000)
    path.write_text('[http]\nmax_connections = "many"\n')
    with pytest.raises(ConfigError, match=r"http\.max_connections must be an integer"):
        load_config(path, env={}, euid=1000)
