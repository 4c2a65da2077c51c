"""No secret in any daemon log line, audit log or CLI output of the test run (issue 10).

The harness registers what it hands out and what the daemons make, so a test that registers
nothing is still checked:

- :meth:`SecretWatch.process` (called by ``Proc.spawn``, tests/integration/process.py): the
  process's log file and its data directory's ``audit.jsonl`` and ``migrations.log`` are watched,
  and its root and data directory are harvested (:func:`harvest`) for the cluster secret file,
  ``master.key`` (and the keys derived from both, the master identity's seed and the scrape token
  among them; a
  node's ``master.pin`` holds a public key, no secret), the bootstrap admin token in the credentials
  file, every CHAP secret in the authority and every replication stream key the master handed out
  (derived again from ``master.key`` and the assignment history);
- :meth:`SecretWatch.cli_run` (called by ``tests.tools.run`` for each ``sparrow`` command): CHAP
  secrets and tokens given on its command line and tokens it printed are registered, and its
  output is checked (but the stdout of ``token create`` and ``metrics token``, whose purpose is to
  show one);
- :func:`register_secret`, :func:`register_token`: anything else a test makes (a CHAP secret
  sent in a plain HTTP body, a token minted over HTTP).

:meth:`SecretWatch.check_captured` reads what pytest captured of a test (stdout, stderr, log
records: the in-process daemons of the unit tests log there) against the same secrets and those
harvested from the test's ``tmp_path`` (tests/conftest.py, ``pytest_runtest_makereport``).

:meth:`SecretWatch.check` reads what was appended to each watched file since the last check (whole
lines only, so it costs one read of each log over the whole run) and looks for every secret of
the roots being watched, in the forms it could be printed in (text, hex, base64). tests/conftest.py
calls it at the end of every test, after the test's fixtures stopped their daemons (a hit fails
that test, naming the file, the line and which secret, never the secret), and once more at the
end of the session for what module-scoped fixtures wrote afterwards. A process whose log has been
read to its end after it exited is no longer watched; a restarted one is watched again from where
its log was read to.
"""

from __future__ import annotations

import base64
import contextlib
import itertools
import json
import os
import re
import sqlite3
import stat
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from sparrow.cluster.channel import ClusterSecret, SecretError
from sparrow.cluster.masteridentity import MasterIdentity
from sparrow.metricsauth import scrape_token
from sparrow.replication.streamauth import derive_stream_key

#: Shorter values are not looked for: they would match ordinary words (a test's deliberately bad secret).
MIN_SECRET_LEN = 8
#: The token format of sparrow.auth.tokens (``spw_<id>_<secret>``): only ``secret`` is secret.
TOKEN = re.compile(rb"spw_[0-9a-f]{16}_(?P<secret>[A-Za-z0-9_-]{43})")
#: The commands whose stdout is a secret: showing it is what they are for.
SHOWS_A_SECRET = frozenset({"token create", "metrics token"})
#: Command-line flags whose value is a secret.
SECRET_FLAGS = frozenset({"--chap-secret", "--chap-mutual-secret", "--token"})
#: Files in a daemon's data directory that hold log lines besides its log file.
DATA_DIR_LOGS = ("audit.jsonl", "migrations.log")
#: The harness's own names (tests/integration/rogue.py SECRET_NAME, sparrow.clustersecret
#: SERVE_SECRET_NAME, sparrow.masterkey MASTER_KEY_NAME, sparrow.cluster.authority AUTHORITY_FILE).
SECRET_FILES = ("cluster.secret", "master.key", "node.key")
AUTHORITY_FILE = "authority.sqlite3"
CREDENTIALS = Path("xdg") / "sparrow" / "credentials.json"
#: At most this many bytes of a file are read per check (a test that filled a file on purpose).
MAX_READ = 256 << 20


@dataclass(frozen=True, slots=True)
class Leak:
    where: str
    line: int
    what: str

    def __str__(self) -> str:
        return f"{self.what} appears in {self.where}, line {self.line}"


class Watched(Protocol):
    """What the watch needs of a process (tests.integration.process.Proc)."""

    root: Path
    data_dir: Path
    log_path: Path

    @property
    def running(self) -> bool: ...


def forms(value: bytes) -> tuple[bytes, ...]:
    """The ways a secret could be printed: as is (if text), hex, base64 (both alphabets, without
    padding). A value shorter than :data:`MIN_SECRET_LEN` is not looked for at all."""
    if len(value) < MIN_SECRET_LEN:
        return ()
    out = {
        value.hex().encode(),
        base64.b64encode(value).rstrip(b"="),
        base64.urlsafe_b64encode(value).rstrip(b"="),
    }
    if value.isascii() and value.decode().isprintable():
        out.add(value)
    return tuple(sorted(out))


def find_leaks(data: bytes, secrets: Mapping[bytes, str], where: str, first_line: int = 1) -> list[Leak]:
    """Every (line, secret) of ``data`` (line numbers from ``first_line``)."""
    leaks = []
    for needle, what in secrets.items():
        start = data.find(needle)
        while start != -1:
            leaks.append(Leak(where, first_line + data.count(b"\n", 0, start), what))
            end_of_line = data.find(b"\n", start)  # one report per line and secret
            start = -1 if end_of_line == -1 else data.find(needle, end_of_line + 1)
    return sorted(leaks, key=lambda leak: (leak.line, leak.what))


# --- harvesting --------------------------------------------------------------------------------


def _read_regular(path: Path, limit: int = 1 << 20) -> bytes | None:
    """A regular file's bytes (never through a symlink, never a device or a fifo); None if none."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        return os.read(fd, limit)
    finally:
        os.close(fd)


def _secret_file(path: Path, what: str) -> dict[bytes, str]:
    """A cluster-secret-format file: its text, and the key derived from it."""
    text = _read_regular(path, 4096)
    if text is None or not text.strip():
        return {}
    found = dict.fromkeys(forms(text.strip()), what)
    if path.name == "node.key":  # the hex of the node's Ed25519 seed (sparrow.nodekey)
        with contextlib.suppress(ValueError):
            seed = bytes.fromhex(text.strip().decode("ascii"))
            found.update(dict.fromkeys(forms(seed), f"{what}, its seed"))
    with contextlib.suppress(SecretError):
        secret = ClusterSecret.from_text(text)
        derived = secret.key
        found.update(dict.fromkeys(forms(derived), f"{what}, derived key"))
        found.update(dict.fromkeys(forms(scrape_token(secret).encode()), f"{what}, its scrape token"))
        if path.name == "master.key":  # the master identity's Ed25519 seed (sparrow.masterkey)
            seed = MasterIdentity.derive(derived).seed
            found.update(dict.fromkeys(forms(seed), f"{what}, the master identity's seed"))
    return found


def _master_key(path: Path) -> bytes | None:
    text = _read_regular(path, 4096)
    try:
        return None if text is None else ClusterSecret.from_text(text).key
    except SecretError:
        return None


def _credentials(path: Path) -> dict[bytes, str]:
    raw = _read_regular(path)
    if raw is None:
        return {}
    found = {}
    for m in TOKEN.finditer(raw):
        found[m["secret"]] = f"a token in {path.name}"
    return found


def _authority(path: Path, master_key: bytes | None) -> dict[bytes, str]:
    """CHAP secrets of every volume the authority ever recorded, and the stream key of every
    (volume, epoch, primary, replica) of its assignment history."""
    if not path.is_file():
        return {}
    found: dict[bytes, str] = {}
    try:
        with contextlib.closing(sqlite3.connect(f"{path.as_uri()}?mode=ro", uri=True, timeout=1.0)) as db:
            for name, secret, mutual in db.execute(
                "SELECT name, chap_secret, chap_mutual_secret FROM volumes"
            ).fetchall():
                for value, which in ((secret, "CHAP secret"), (mutual, "mutual CHAP secret")):
                    if isinstance(value, str):
                        found.update(dict.fromkeys(forms(value.encode()), f"{which} of volume {name}"))
            if master_key is not None:
                rows = db.execute(
                    "SELECT volume_id, epoch, primary_node, replicas FROM assignments"
                ).fetchall()
                for volume_id, epoch, primary, replicas in rows:
                    for replica in json.loads(replicas) if primary else ():
                        if replica != primary:
                            key = derive_stream_key(master_key, volume_id, epoch, primary, replica)
                            what = f"stream key ({volume_id[:8]}, epoch {epoch}, {primary} -> {replica})"
                            found.update(dict.fromkeys(forms(key), what))
    except sqlite3.Error:
        return found  # a test that damaged its authority on purpose
    return found


def harvest(root: Path, data_dir: Path) -> dict[bytes, str]:
    """The secrets the harness and a daemon made under ``root`` and ``data_dir`` (module docstring)."""
    found: dict[bytes, str] = {}
    for directory in {root, data_dir}:
        for name in SECRET_FILES:
            found.update(_secret_file(directory / name, f"the {name} file in {directory.name}/"))
    found.update(_credentials(root / CREDENTIALS))
    found.update(_authority(data_dir / AUTHORITY_FILE, _master_key(data_dir / "master.key")))
    return found


def secrets_on_command_line(argv: Sequence[str]) -> dict[bytes, str]:
    found: dict[bytes, str] = {}
    for flag, value in itertools.pairwise(argv):
        if flag in SECRET_FLAGS:
            found.update(dict.fromkeys(forms(value.encode()), f"the value of {flag}"))
    for arg in argv:
        if arg.startswith(tuple(f"{f}=" for f in SECRET_FLAGS)):
            flag, _, value = arg.partition("=")
            found.update(dict.fromkeys(forms(value.encode()), f"the value of {flag}"))
        for m in TOKEN.finditer(arg.encode()):
            found[m["secret"]] = "a token on the command line"
    return found


# --- the watch ---------------------------------------------------------------------------------


@dataclass
class _Position:
    inode: int = -1
    offset: int = 0
    line: int = 1


@dataclass
class SecretWatch:
    """The session's watch (module docstring)."""

    by_root: dict[Path, dict[bytes, str]] = field(default_factory=dict)
    #: Registered by the current test (register_secret), dropped at the end of the test.
    extra: dict[bytes, str] = field(default_factory=dict)
    processes: list[Watched] = field(default_factory=list)
    positions: dict[Path, _Position] = field(default_factory=dict)
    outputs: list[tuple[str, Path | None, str]] = field(default_factory=list)
    #: Every secret ever harvested or registered (for the session's "nothing registered" guard).
    registered: int = 0
    watched: int = 0

    # -- registering ----------------------------------------------------------------------------

    def secret(self, value: str | bytes, what: str, root: Path | None = None) -> None:
        raw = value.encode() if isinstance(value, str) else value
        found = dict.fromkeys(forms(raw), what)
        (self.extra if root is None else self.by_root.setdefault(root, {})).update(found)
        self.registered += len(found)

    def process(self, proc: Watched) -> None:
        if all(p is not proc for p in self.processes):
            self.processes.append(proc)
        self.watched += 1
        self._harvest(proc)

    def cli_run(self, argv: Sequence[str], env: Mapping[str, str] | None, stdout: str, stderr: str) -> None:
        xdg = (env or {}).get("XDG_CONFIG_HOME")
        root = Path(xdg).parent if xdg else None
        given = secrets_on_command_line(argv)
        printed = {m["secret"]: "a token printed by the CLI" for m in TOKEN.finditer(stdout.encode())}
        for found in (given, printed):
            (self.extra if root is None else self.by_root.setdefault(root, {})).update(found)
            self.registered += len(found)
        command = _subcommand(argv)
        label = f"the output of `sparrow {command}`"
        if command not in SHOWS_A_SECRET:
            self.outputs.append((f"{label} (stdout)", root, stdout))
        self.outputs.append((f"{label} (stderr)", root, stderr))

    def _harvest(self, proc: Watched) -> None:
        found = harvest(proc.root, proc.data_dir)
        known = self.by_root.setdefault(proc.root, {})
        self.registered += len(found.keys() - known.keys())
        known.update(found)

    # -- checking -------------------------------------------------------------------------------

    def _secrets(self, roots: Iterable[Path | None]) -> dict[bytes, str]:
        merged = dict(self.extra)
        for root in roots:
            if root is not None:
                merged.update(self.by_root.get(root, {}))
        return merged

    def check(self, *, final: bool = False) -> list[Leak]:
        """Scan what was appended since the last check; ``final``: partial last lines too."""
        for proc in self.processes:
            self._harvest(proc)
        roots = {p.root for p in self.processes} | {root for _, root, _ in self.outputs}
        secrets = self._secrets(roots)
        leaks: list[Leak] = []
        still: list[Watched] = []
        for proc in self.processes:
            running = proc.running
            for path in (proc.log_path, *(proc.data_dir / name for name in DATA_DIR_LOGS)):
                leaks.extend(self._scan(path, secrets, whole=final or not running))
            if running:
                still.append(proc)
        self.processes = still
        for label, root, text in self.outputs:
            leaks.extend(find_leaks(text.encode(), self._secrets([root]) | secrets, label))
        self.outputs.clear()
        self.extra.clear()
        return leaks

    def check_captured(self, sections: Iterable[tuple[str, str]], tmp_path: Path | None) -> list[Leak]:
        """What pytest captured of a test (its in-process logs and prints: ``(title, text)``),
        against the secrets of the watched daemons, the test's own and those a test made in its
        ``tmp_path`` (a data directory or credentials file of an in-process daemon)."""
        secrets = self._secrets({p.root for p in self.processes})
        if tmp_path is not None:
            secrets.update(harvest(tmp_path, tmp_path))
            for data_dir in (d for d in tmp_path.iterdir() if d.is_dir()) if tmp_path.is_dir() else ():
                secrets.update(harvest(tmp_path, data_dir))
        leaks: list[Leak] = []
        for title, text in sections:
            leaks.extend(find_leaks(text.encode(errors="replace"), secrets, title))
        return leaks

    def _scan(self, path: Path, secrets: Mapping[bytes, str], *, whole: bool) -> list[Leak]:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        except OSError:
            return []
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                return []
            pos = self.positions.setdefault(path, _Position())
            if pos.inode != st.st_ino or st.st_size < pos.offset:  # a new or a truncated file
                pos.inode, pos.offset, pos.line = st.st_ino, 0, 1
            data = os.pread(fd, min(MAX_READ, st.st_size - pos.offset), pos.offset)
        finally:
            os.close(fd)
        if not whole:
            data = data[: data.rfind(b"\n") + 1]  # a line being written is read next time
        leaks = find_leaks(data, secrets, str(path), pos.line)
        pos.offset += len(data)
        pos.line += data.count(b"\n")
        return leaks


def _subcommand(argv: Sequence[str]) -> str:
    """``volume create`` of ``python -m sparrow volume create NAME --size ...``."""
    rest = list(argv[argv.index("sparrow") + 1 :] if "sparrow" in argv else argv[1:])
    words = []
    for arg in rest[:2]:
        if arg.startswith("-"):
            break
        words.append(arg)
    return " ".join(words)


#: The session's watch (one pytest process: xdist is not used).
WATCH = SecretWatch()


def register_secret(value: str | bytes, what: str) -> None:
    """A secret the current test made that the harness does not see (a plain HTTP call's body)."""
    WATCH.secret(value, what)


def register_token(token: str, what: str) -> None:
    """An API token (``spw_<id>_<secret>``) the test minted over plain HTTP: its secret part (the
    id is public and may be logged)."""
    m = TOKEN.fullmatch(token.encode())
    assert m is not None, "not a Sparrow API token"
    WATCH.secret(m["secret"], what)


def is_sparrow_command(cmd: Sequence[str]) -> bool:
    return (len(cmd) >= 3 and cmd[1:3] == ["-m", "sparrow"]) or (bool(cmd) and cmd[0].endswith("/sparrow"))
