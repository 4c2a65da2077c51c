"""Who may open a replication stream (docs/replication.md, "Who may open a stream").

The cluster channel proves only that a peer holds the cluster secret, which every member does. So
the master, which alone holds its **master key** (``sparrow.masterkey``: a file in its data
directory, never sent anywhere), derives for each published assignment and each replica of it a
**stream key**::

    K = HMAC-SHA256(master_key, "sparrow replication v1" | 0 | volume_id (16 bytes) | epoch (u64)
                    | len(primary) (u8) | primary | len(replica) (u8) | replica)

and hands it out in the Ack (ack v6, ``Ack.stream_keys``; the heartbeat channel is authenticated
and encrypted): to the primary, K for each of its replicas; to each replica, only its own. The
node keeps them in memory with the latest Ack (``Convergence.stream_key``); nothing of it is
persisted anywhere (the master derives them again for every Ack).

The primary's OPEN carries a proof of K bound to the connection it travels on::

    proof = HMAC-SHA256(K, "sparrow replication open v1" | len(binding) (u16) | binding
                        | volume_id (16 bytes) | epoch (u64) | first_seq (u64) | session (u64)
                        | flags (u8) | primary)

``binding`` is the channel's handshake transcript (``Channel.binding``: both nonces), so an OPEN
recorded on one connection proves nothing on another. The replica computes the same with the K it
holds for (volume, its persisted epoch) and compares with ``hmac.compare_digest``
(``ReplicaStream``): a member that is not the primary of that epoch, or a replica that has no K
for it (not yet told, or restarted and not yet acked), refuses with ``not_authorized``.

Sans-IO: bytes in, bytes out.
"""

from __future__ import annotations

import hashlib
import hmac
import struct
from collections.abc import Iterable

from sparrow.cluster.messages import Assignment, StreamKey

#: The size of a stream key, of a master key and of an OPEN's proof.
KEY_SIZE = 32
PROOF_SIZE = 32
#: A proof nobody computed: what an OPEN carries when the primary has no key (always refused).
NO_PROOF = bytes(PROOF_SIZE)
_KEY_LABEL = b"sparrow replication v1\x00"
_OPEN_LABEL = b"sparrow replication open v1\x00"
_U64 = struct.Struct(">Q")
_U16 = struct.Struct(">H")


def _node(node_id: str) -> bytes:
    raw = node_id.encode("ascii")
    return bytes((len(raw),)) + raw


def derive_stream_key(master_key: bytes, volume_id: str, epoch: int, primary: str, replica: str) -> bytes:
    """K for the stream of ``volume_id`` at ``epoch`` from ``primary`` to ``replica``."""
    if len(master_key) < KEY_SIZE:
        raise ValueError(f"a master key has at least {KEY_SIZE} bytes")
    message = _KEY_LABEL + bytes.fromhex(volume_id) + _U64.pack(epoch) + _node(primary) + _node(replica)
    return hmac.new(master_key, message, hashlib.sha256).digest()


def stream_keys_for(
    master_key: bytes, node_id: str, assignments: Iterable[Assignment]
) -> tuple[StreamKey, ...]:
    """What an Ack to ``node_id`` carries for ``assignments`` (those naming it): as the primary, K
    for each other copy; as a replica, its own K; nothing for a volume without a primary."""
    keys: list[StreamKey] = []
    for a in assignments:
        if a.primary is None or node_id not in a.replicas:
            continue
        targets = [r for r in a.replicas if r != a.primary] if node_id == a.primary else [node_id]
        keys.extend(
            StreamKey(a.volume_id, r, derive_stream_key(master_key, a.volume_id, a.epoch, a.primary, r))
            for r in targets
        )
    return tuple(keys)


def open_proof(
    key: bytes,
    binding: bytes,
    *,
    volume_id: str,
    epoch: int,
    first_seq: int,
    session: int,
    flags: int,
    primary: str,
) -> bytes:
    """The proof an OPEN with these fields carries on the connection of ``binding``."""
    message = (
        _OPEN_LABEL
        + _U16.pack(len(binding))
        + binding
        + bytes.fromhex(volume_id)
        + _U64.pack(epoch)
        + _U64.pack(first_seq)
        + _U64.pack(session)
        + bytes((flags,))
        + primary.encode("ascii")
    )
    return hmac.new(key, message, hashlib.sha256).digest()


def proof_matches(expected: bytes, proof: bytes) -> bool:
    """Constant-time comparison of an OPEN's proof with the one this replica computed."""
    return hmac.compare_digest(expected, proof)
