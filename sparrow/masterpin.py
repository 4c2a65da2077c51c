"""The node's pinned master key, ``DATA_DIR/master.pin`` (docs/cluster.md, "Master identity").

64 hex digits (the master's Ed25519 public key, ``sparrow master key`` prints it) and a newline.
Mode 0644: it is a public key, nothing in it is secret, and monitoring may read it; what matters is
that nobody else can *change* it, so a pin file that group or others may write, one that another
user owns (sparrow.privatefile.foreign_owner), a symlink or anything but a regular file is
refused, as is one that does not hold a key: the node stops with one line (it never falls back to
trust on first use on its own, since that would let the next member that plays master be pinned).
Written atomically (a temporary file, fsynced, renamed over, the directory fsynced), so a crash
leaves the old pin or the new one.

Where the pin comes from at the node's start (:func:`startup_pin`): the operator's
``--master-key HEX`` wins and is written to the file (a different pin there is replaced and
logged: that is how an operator re-pins after changing the master's key on purpose); else the
file; else none, and the node pins the first master that proves a key (trust on first use,
written here before the node says Hello to it).
"""

from __future__ import annotations

import contextlib
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from sparrow.cluster.channel import SecretError
from sparrow.cluster.masteridentity import MASTER_KEY_SIZE, parse_master_key
from sparrow.cluster.nodeidentity import key_text
from sparrow.privatefile import foreign_owner
from store.metadata import fsync_dir

PIN_NAME = "master.pin"
PIN_MODE = 0o644
#: Larger than this is not a pin file.
MAX_PIN_FILE = 256


def _bad(path: Path, why: str) -> SecretError:
    return SecretError(
        f"master pin file {path} {why}; fix it, or remove it and start the node with "
        "--master-key KEY (the key `sparrow master key` prints on the master)"
    )


def load_pin(data_dir: Path) -> bytes | None:
    """The key pinned in ``data_dir`` (None: no pin file). Raises SecretError with one line."""
    path = data_dir / PIN_NAME
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except FileNotFoundError:
        return None
    except OSError as e:
        raise _bad(path, f"cannot be opened ({e.strerror or e})") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise _bad(path, "is not a regular file")
        if (owner := foreign_owner(st)) is not None:
            raise _bad(path, f"belongs to another user (uid {owner})")
        if st.st_mode & 0o022:
            raise _bad(path, f"may be written by group or others (mode {stat.S_IMODE(st.st_mode):04o})")
        data = os.read(fd, MAX_PIN_FILE + 1)
    finally:
        os.close(fd)
    try:
        return parse_master_key(data.decode("ascii"))
    except (UnicodeDecodeError, ValueError):
        raise _bad(path, f"does not hold a master key ({2 * MASTER_KEY_SIZE} hex digits)") from None


def save_pin(data_dir: Path, key: bytes) -> None:
    """Pin ``key`` in ``data_dir`` (mode 0644, atomically, replacing a pin there). Raises OSError."""
    path = data_dir / PIN_NAME
    tmp = path.with_name(f".{PIN_NAME}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, PIN_MODE)
    try:
        try:
            os.fchmod(fd, PIN_MODE)  # whatever the umask
            os.write(fd, key_text(key).encode() + b"\n")
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    fsync_dir(data_dir)


@dataclass(frozen=True, slots=True)
class StartupPin:
    """The pin a node starts with: ``key`` (None: trust on first use), where it came from
    (``operator``, ``file``, ``none``) and the pin the operator's key replaced, if any."""

    key: bytes | None
    source: str
    replaced: bytes | None = None


def startup_pin(data_dir: Path, operator_key: bytes | None) -> StartupPin:
    """The node's pin at start (the module docstring). Raises SecretError (a bad pin file) or
    OSError (the operator's key cannot be written)."""
    if operator_key is None:
        pinned = load_pin(data_dir)
        return StartupPin(pinned, "file" if pinned is not None else "none")
    try:
        pinned = load_pin(data_dir)
    except SecretError:
        pinned = None  # a bad pin file: the operator's key replaces it
    if pinned != operator_key:
        save_pin(data_dir, operator_key)
    return StartupPin(operator_key, "operator", pinned if pinned not in (None, operator_key) else None)
