"""Volume record v1 -> v2: an explicit cluster identity and an explicit physical block size.

- ``volume_id``: the master-minted volume id (docs/cluster.md, "Identities and numbers"). A v1
  record predates the master, so its id is its existing ``uuid``: the identity the node already
  reports (serial and NAA designators, SPC-4 7.8.6 / 7.8.5.6.4, are derived from it) is unchanged.
- ``physical_block_size``: records written before it existed lack the key; v2 always has it
  (null = the logical block size, as v1 readers assumed).

Nothing else changes; ``uuid``, ``name`` and every other field are copied as they are.
"""

from __future__ import annotations

from typing import Any

kind = "volume"
from_version = 1
to_version = 2
describe = "add volume_id (a v1 volume keeps its uuid as its id) and an explicit physical_block_size"


def upgrade(record: dict[str, Any]) -> dict[str, Any]:
    """The v2 body of a v1 body (a new dict; the argument is not modified)."""
    uuid_hex = record.get("uuid")
    if not isinstance(uuid_hex, str) or not uuid_hex:
        raise ValueError("v1 volume record has no uuid to derive volume_id from")
    upgraded = dict(record)
    upgraded.setdefault("volume_id", uuid_hex)
    upgraded.setdefault("physical_block_size", None)
    return upgraded
