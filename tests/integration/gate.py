"""The final gate's driver: a real initiator (``tests/tools/gatewriter.c``, libiscsi) writes verifiable
blocks, and every write it saw acknowledged must read back afterwards.

:func:`gatewriter` compiles the C program into ``build/`` (gcc and libiscsi-dev, both installed by
`make test`; a missing one fails the test, never skips it). :class:`Writer` runs it in write mode and
keeps its :class:`Journal` up to date from its stdout, line by line, so the test knows exactly what
was acknowledged even when the target dies mid-run. :meth:`Journal.check` judges what a copy holds:
each block must hold its latest acknowledged write, or a later write that was sent but never
acknowledged (it may or may not have landed); anything older than the latest acknowledgement, a
zero block that was acknowledged, or a block that does not decode is a loss. Contents come either
through the target (:func:`read_through_target`, gatewriter's verify mode) or straight from a copy's
data file (:func:`read_data_file`).

Block format (4 KiB, all u64 little-endian): a 40-byte record, magic ``SPRGATE1``, block number,
write counter, run id, FNV-1a-64 of those 32 bytes, repeated 102 times, then 16 bytes of 0xA5.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.tools import APT_PACKAGES, run

BLOCK = 4096
RECORD = 40
RECORDS = BLOCK // RECORD
PAD = b"\xa5" * (BLOCK - RECORDS * RECORD)
MAGIC = b"SPRGATE1"

REPO = Path(__file__).resolve().parents[2]
HEADER = Path("/usr/include/iscsi/iscsi.h")
INSTALL_HINT = f"run `make test` (it installs: {APT_PACKAGES})"


def libiscsi_tool(name: str) -> Path:
    """``build/NAME``, compiled from ``tests/tools/NAME.c`` against libiscsi when missing or older
    than the source (the gate's writer, test_explain's raw-CDB sender)."""
    source = REPO / "tests" / "tools" / f"{name}.c"
    binary = REPO / "build" / name
    if binary.exists() and binary.stat().st_mtime >= source.stat().st_mtime:
        return binary
    gcc = shutil.which("gcc")
    if gcc is None:
        pytest.fail(f"gcc is not installed; {INSTALL_HINT}")
    if not HEADER.exists():
        pytest.fail(f"{HEADER} is missing (libiscsi-dev); {INSTALL_HINT}")
    binary.parent.mkdir(exist_ok=True)
    tmp = binary.with_suffix(f".{time.monotonic_ns()}.tmp")  # parallel builds never see half a file
    proc = subprocess.run(
        [gcc, "-O2", "-Wall", "-Wextra", "-Werror", "-o", str(tmp), str(source), "-liscsi"],
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        pytest.fail(f"building {source.name} failed:\n{proc.stderr}")
    tmp.replace(binary)
    return binary


def gatewriter() -> Path:
    """The compiled gatewriter (tests/tools/gatewriter.c)."""
    return libiscsi_tool("gatewriter")


# -- the block format -----------------------------------------------------------------------------


def fnv1a64(data: bytes) -> int:
    h = 0xCBF29CE484222325
    for b in data:
        h = ((h ^ b) * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return h


@dataclass(frozen=True, slots=True)
class Written:
    """A block that decodes: the write counter and run id it carries."""

    counter: int
    run_id: int


#: What a block holds: a decoded write, ``"zero"`` (never written), or ``"bad"`` (does not decode).
Content = Written | str


def decode_block(data: bytes, block: int) -> Content:
    if data.count(0) == len(data):
        return "zero"
    record = data[:RECORD]
    if (
        len(data) != BLOCK
        or record[:8] != MAGIC
        or int.from_bytes(record[8:16], "little") != block
        or int.from_bytes(record[32:40], "little") != fnv1a64(record[:32])
        or data[: RECORDS * RECORD] != record * RECORDS
        or data[RECORDS * RECORD :] != PAD
    ):
        return "bad"
    return Written(int.from_bytes(record[16:24], "little"), int.from_bytes(record[24:32], "little"))


def read_data_file(path: Path, blocks: int) -> dict[int, Content]:
    """The first ``blocks`` blocks of a copy's data file, decoded."""
    with path.open("rb") as f:
        data = f.read(blocks * BLOCK)
    data = data.ljust(blocks * BLOCK, b"\0")  # a sparse file shorter than written is zeros
    return {b: decode_block(data[b * BLOCK : (b + 1) * BLOCK], b) for b in range(blocks)}


def read_through_target(url: str, blocks: int) -> dict[int, Content]:
    """The first ``blocks`` blocks as the target serves them (gatewriter verify)."""
    out = run([str(gatewriter()), "verify", url, "--blocks", str(blocks)], timeout=60).stdout
    contents: dict[int, Content] = {}
    for line in out.splitlines():
        parts = line.split()
        if parts[0] != "V":
            continue
        block = int(parts[1])
        contents[block] = Written(int(parts[2]), int(parts[3])) if len(parts) == 4 else parts[2]
    assert len(contents) == blocks, out[-2000:]
    return contents


# -- what the writer saw ------------------------------------------------------------------------


@dataclass
class Journal:
    """Everything the writer reported, in order. Counters are unique per run."""

    run_id: int
    blocks: int = 0
    acked: dict[int, int] = field(default_factory=dict)  # block -> latest acknowledged counter
    acks: list[tuple[int, int]] = field(default_factory=list)  # (block, counter) in ack order
    ack_times: list[float] = field(default_factory=list)  # wall-clock time of each ack (time.time())
    #: Per reconnect, the number of acks before it: acks[i] for i >= that came on the new session.
    reconnect_acks: list[int] = field(default_factory=list)
    unacked: dict[int, set[int]] = field(default_factory=dict)  # block -> counters sent, never acked
    durable: int = 0  # the first `durable` acks are known durable (SYNCHRONIZE CACHE GOOD)
    fua: int = 0  # acks of FUA writes (each durable at its ack)
    reconnects: int = 0
    errors: list[str] = field(default_factory=list)
    done: bool = False

    def feed(self, line: str) -> None:
        parts = line.split()
        if not parts:
            return
        kind = parts[0]
        if kind == "A":
            block, counter = int(parts[1]), int(parts[2])
            self.acked[block] = counter
            self.acks.append((block, counter))
            self.fua += parts[3] == "1"
            self.ack_times.append(float(parts[4]) if len(parts) > 4 else float("nan"))
        elif kind == "X":
            self.unacked.setdefault(int(parts[1]), set()).add(int(parts[2]))
        elif kind == "F":
            self.durable = max(self.durable, int(parts[1]))
        elif kind == "R":
            self.reconnects = int(parts[1])
            self.reconnect_acks.append(len(self.acks))
        elif kind == "I":
            self.blocks = int(parts[1])
        elif kind == "E":
            self.errors.append(line)
        elif kind == "D":
            self.done = True

    def check(self, contents: Mapping[int, Content], where: str) -> list[str]:
        """What ``contents`` lost: one line per block that does not hold its latest acknowledged
        write or a later one that was sent unacknowledged (empty when nothing was lost)."""
        problems = []
        for block in range(self.blocks):
            got = contents[block]
            latest = self.acked.get(block)
            maybe = self.unacked.get(block, set())
            if isinstance(got, Written):
                later_unacked = got.counter in maybe and (latest is None or got.counter > latest)
                if got.run_id != self.run_id:
                    problems.append(f"{where}: block {block} holds run {got.run_id}, not {self.run_id}")
                elif got.counter != latest and not later_unacked:
                    problems.append(
                        f"{where}: block {block} holds write {got.counter}, latest ack {latest}"
                        f" (unacknowledged sends: {sorted(maybe)[-5:]})"
                    )
            elif got == "zero" and latest is None:
                continue
            else:
                problems.append(f"{where}: block {block} is {got}, latest ack {latest}")
        return problems


class Writer:
    """``gatewriter write URL`` in the background; its stdout feeds :attr:`journal` as it comes."""

    def __init__(
        self,
        url: str,
        *,
        run_id: int,
        blocks: int,
        depth: int = 8,
        sync_every: int = 0,
        fua: bool = False,
        seed: int = 0,
        reconnect_timeout: float = 30.0,
    ) -> None:
        self.journal = Journal(run_id)
        self._stderr_text = ""
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        cmd = [
            str(gatewriter()), "write", url,
            "--run-id", str(run_id), "--blocks", str(blocks), "--depth", str(depth),
            "--sync-every", str(sync_every), "--seed", str(seed or run_id),
            "--reconnect-timeout", str(reconnect_timeout),
        ]  # fmt: skip
        if fua:
            cmd.append("--fua")
        self._stderr = tempfile.TemporaryFile()  # noqa: SIM115 (closed in close())
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=self._stderr, text=True)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        with self.proc.stdout:
            for line in self.proc.stdout:
                with self._changed:
                    self.journal.feed(line)
                    self._changed.notify_all()
        with self._changed:
            self._changed.notify_all()

    @property
    def acked(self) -> int:
        with self._lock:
            return len(self.journal.acks)

    def wait(self, what: str, predicate: Callable[[Journal], bool], timeout: float) -> None:
        """Wait until ``predicate(journal)`` holds (the writer must keep running meanwhile)."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while not predicate(self.journal):
                left = deadline - time.monotonic()
                if self.proc.poll() is not None and not self._reader.is_alive():
                    code = self.proc.returncode
                    raise AssertionError(f"gatewriter exited {code} before {what}: {self.stderr()}")
                if left <= 0:
                    raise AssertionError(f"timed out after {timeout}s waiting for {what}; {self.summary()}")
                self._changed.wait(min(left, 0.5))

    def wait_acked(self, n: int, timeout: float = 30.0) -> None:
        self.wait(f"{n} acknowledged writes", lambda j: len(j.acks) >= n, timeout)

    def wait_reconnects(self, n: int, timeout: float = 30.0) -> None:
        self.wait(f"reconnect #{n}", lambda j: j.reconnects >= n, timeout)

    def stop(self, timeout: float = 30.0) -> Journal:
        """SIGTERM: the writer issues nothing new, waits for what is in flight, and exits 0."""
        if self.proc.poll() is None:
            self.proc.terminate()
        code = self.proc.wait(timeout=timeout)
        self._reader.join(timeout)
        self.close()
        assert code == 0, f"gatewriter exited {code}: {self.stderr()}"
        assert self.journal.done, self.summary()
        return self.journal

    def kill(self) -> None:
        """SIGKILL if still running (a test that failed midway), and close."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._reader.join(10)
        self.close()

    def close(self) -> None:
        if not self._stderr.closed:
            self._stderr.seek(0)
            self._stderr_text = self._stderr.read().decode(errors="replace")
            self._stderr.close()

    def stderr(self) -> str:
        if self.proc.poll() is None:
            return ""
        self.close()
        return self._stderr_text[-2000:]

    def summary(self) -> str:
        j = self.journal
        return (
            f"{len(j.acks)} acked, {sum(map(len, j.unacked.values()))} unacked, {j.reconnects} reconnects,"
            f" last errors {j.errors[-3:]}"
        )
