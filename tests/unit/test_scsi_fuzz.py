"""Random CDBs and Data-Out never raise out of LogicalUnit.execute (nor out of no_such_lun)."""

from __future__ import annotations

import asyncio

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from frontend.scsi.lu import AccessState, LogicalUnit, no_such_lun
from frontend.scsi.opcodes import Opcode
from frontend.scsi.types import ScsiResult, ScsiStatus
from store.memstore import MemoryBlockStore
from tests.unit.test_scsi_helpers import IDENTITY, A, B, request

_KNOWN = [int(op) for op in Opcode]

# A known opcode with random fields reaches deep into the handlers; a random one tests the rest.
cdbs = st.one_of(
    st.builds(
        lambda op, rest: bytes([op]) + rest, st.sampled_from(_KNOWN), st.binary(min_size=0, max_size=31)
    ),
    st.binary(min_size=0, max_size=32),
)
# Small LBAs and lengths hit the success paths, not only LBA OUT OF RANGE.
small_cdbs = st.builds(
    lambda op, b1, lba, n: bytes([op, b1]) + lba.to_bytes(8, "big") + n.to_bytes(4, "big") + b"\0\0",
    st.sampled_from(_KNOWN),
    st.integers(0, 255),
    st.integers(0, 40),
    st.integers(0, 8),
)


def _run(cdb: bytes, data: bytes, state: AccessState, block_size: int) -> list[ScsiResult]:
    async def go() -> list[ScsiResult]:
        store = MemoryBlockStore(64 * block_size, block_size)
        lu = LogicalUnit(store, IDENTITY)
        lu.access_state = state
        out = [await lu.execute(request(cdb, data, nexus)) for nexus in (A, B, A)]
        out.append(no_such_lun(request(cdb, data)))
        return out

    return asyncio.run(go())


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    cdb=st.one_of(cdbs, small_cdbs),
    data=st.one_of(st.just(b""), st.binary(max_size=1100)),
    state=st.sampled_from(list(AccessState)),
    block_size=st.sampled_from([512, 4096]),
)
def test_random_cdbs_never_raise(cdb: bytes, data: bytes, state: AccessState, block_size: int) -> None:
    for res in _run(cdb, data, state, block_size):
        assert isinstance(res.status, ScsiStatus)
        if res.status == ScsiStatus.CHECK_CONDITION:
            assert res.sense is not None and len(res.sense) == 18
        else:
            assert res.sense is None
