"""CRC32C header and data digests (RFC 7143 13.1, 11.1; test vectors in RFC 3720 B.4).

The digest is the CRC32C of the bytes it covers (BHS + AHS for the header digest; the data segment
including its padding for the data digest) sent as 4 bytes, least significant byte first.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable

import crc32c as _crc32c

_LE32 = struct.Struct("<I")
DIGEST_LENGTH = 4


def crc32c(parts: Iterable[bytes | bytearray | memoryview]) -> int:
    """CRC32C over the concatenation of ``parts``, without concatenating them."""
    value = 0
    for part in parts:
        value = _crc32c.crc32c(part, value)
    return int(value)


def crc32c_one(data: bytes | bytearray | memoryview, value: int = 0) -> int:
    return int(_crc32c.crc32c(data, value))


def digest(parts: Iterable[bytes | bytearray | memoryview]) -> bytes:
    """The 4 digest bytes as they go on the wire."""
    return _LE32.pack(crc32c(parts))


def digest_value(raw: bytes | bytearray | memoryview, offset: int = 0) -> int:
    """Read a digest from the wire."""
    return int(_LE32.unpack_from(raw, offset)[0])


def pack_digest(value: int) -> bytes:
    return _LE32.pack(value)


def pack_digest_into(buf: bytearray, offset: int, value: int) -> None:
    """Write a digest into ``buf`` at ``offset``, as ``pack_digest`` would send it."""
    _LE32.pack_into(buf, offset, value)
