"""The store's I/O threads (store/iopool.py): results and errors reach the awaiting coroutine, and the
completions of one batch wake the event loop once."""

from __future__ import annotations

import asyncio
import errno
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

import store.blockstore as blockstore
from store.blockstore import FileBlockStore
from store.iopool import IoPool

DEADLINE = 10.0


async def test_a_batch_of_completions_wakes_the_loop_once() -> None:
    pool = IoPool(2)
    # Two fences after the 32 jobs hold both workers until the loop thread joins them: by then each
    # worker has handed back every job it took, while the loop could not run a single callback.
    fences = threading.Barrier(3, timeout=DEADLINE)
    jobs = [pool.submit(int, i) for i in range(32)]
    both = [pool.submit(fences.wait) for _ in range(2)]
    fences.wait()
    assert await asyncio.gather(*jobs) == list(range(32))
    await asyncio.gather(*both)
    # One wake-up for the 32 jobs; the fences' own completions, after the loop ran again, at most two
    # more. Handing results back one by one (run_in_executor) would wake the loop 34 times.
    assert 1 <= pool.wakeups <= 3


async def test_an_exception_reaches_the_awaiting_coroutine() -> None:
    pool = IoPool(1)

    def fail() -> None:
        raise OSError(errno.EIO, "injected")

    with pytest.raises(OSError) as caught:
        await pool.submit(fail)
    assert caught.value.errno == errno.EIO


async def test_a_cancelled_call_finishes_and_is_dropped() -> None:
    pool = IoPool(1)
    release = threading.Event()
    ran = threading.Event()

    def blocked() -> str:
        release.wait(DEADLINE)
        ran.set()
        return "late"

    first = pool.submit(blocked)
    first.cancel()
    release.set()
    assert await pool.submit(str, "next") == "next"  # one worker: it ran after the cancelled call
    assert ran.is_set() and first.cancelled()


async def test_the_store_hands_disk_io_to_the_pool_unless_switched_off(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # As on a filesystem without RWF_NOWAIT, wherever tmp_path is (on tmpfs the store stays on the loop).
    monkeypatch.setattr(blockstore, "_choose_io_path", lambda fd: blockstore.IoPath.POOL)
    store = await FileBlockStore.open(str(tmp_path / "v.img"), block_size=512, size=1 << 20, create=True)
    try:
        assert store.io_path is blockstore.IoPath.POOL
        before = blockstore._POOL.wakeups
        await store.write(0, b"a" * 4096)
        assert blockstore._POOL.wakeups > before
        monkeypatch.setattr(blockstore, "BATCHED", False)
        before = blockstore._POOL.wakeups
        await store.write(4096, b"b" * 4096)
        assert await store.read(0, 8192) == b"a" * 4096 + b"b" * 4096
        assert blockstore._POOL.wakeups == before  # the executor did it
    finally:
        await store.close()


@pytest.mark.parametrize(("value", "batched"), [(None, True), ("1", True), ("0", False)])
def test_sparrow_io_batched_switches_the_hand_off(value: str | None, batched: bool) -> None:
    env = {k: v for k, v in os.environ.items() if k != "SPARROW_IO_BATCHED"}
    if value is not None:
        env["SPARROW_IO_BATCHED"] = value
    out = subprocess.run([sys.executable, "-c", "import store.iopool as p; print(p.BATCHED)"], env=env,
                         capture_output=True, text=True, check=True, timeout=DEADLINE).stdout
    assert out.strip() == str(batched)
