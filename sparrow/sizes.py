"""Human sizes: ``"64MiB"``, ``"1GiB"``, ``"10G"``, ``"1.5GiB"``, ``"4096"``.

Every suffix is binary. ``K``/``KiB`` = 1024, ``M``/``MiB`` = 1024**2, ``G``/``GiB`` = 1024**3,
``T``/``TiB`` = 1024**4, ``P``/``PiB`` = 1024**5: a bare letter means the binary unit, as it does for
``qemu-img create`` and ``truncate -s``. A number without a suffix (or with ``B``) is bytes. Letters
are case-insensitive. The SI spellings ``KB``/``MB``/``GB``/``TB`` are refused because they are
ambiguous (decimal to some tools, binary to others). A fraction is allowed when the result is a
whole number of bytes (``"1.5GiB"``); zero and negative sizes are refused.
"""

from __future__ import annotations

import re
from fractions import Fraction

#: Largest size accepted: SBC-3 capacities are 64-bit LBAs, and files are limited to 2**63 - 1 bytes.
MAX_SIZE = 2**63 - 1

_UNITS: dict[str, int] = {
    "": 1,
    "b": 1,
    "k": 1024,
    "kib": 1024,
    "m": 1024**2,
    "mib": 1024**2,
    "g": 1024**3,
    "gib": 1024**3,
    "t": 1024**4,
    "tib": 1024**4,
    "p": 1024**5,
    "pib": 1024**5,
}
_AMBIGUOUS = frozenset({"kb", "mb", "gb", "tb", "pb"})
_SIZE_RE = re.compile(r"^\s*(?P<number>[+-]?(?:\d+(?:\.\d*)?|\.\d+))\s*(?P<unit>[A-Za-z]*)\s*$")

_DISPLAY_UNITS = (("PiB", 1024**5), ("TiB", 1024**4), ("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024))


class SizeError(ValueError):
    """A size that cannot be used; the message names the input and says what is accepted."""


def parse_size(text: str | int) -> int:
    """The number of bytes ``text`` stands for. Raises SizeError with a one-line message."""
    if isinstance(text, bool):
        raise SizeError(f"invalid size {text!r}: expected a number of bytes or a size like 64MiB")
    if isinstance(text, int):
        value = text
        shown = str(text)
    else:
        shown = text
        m = _SIZE_RE.match(text)
        if m is None:
            raise SizeError(
                f"invalid size {text!r}: expected a number with an optional unit "
                "(K, M, G, T or KiB, MiB, GiB, TiB; all binary), e.g. 64MiB"
            )
        unit = m["unit"].lower()
        if unit in _AMBIGUOUS:
            binary = unit[0].upper() + "iB"
            raise SizeError(
                f"invalid size {text!r}: unit {m['unit']!r} is ambiguous; write {binary} "
                f"(or {unit[0].upper()}, which also means {binary})"
            )
        if unit not in _UNITS:
            raise SizeError(
                f"invalid size {text!r}: unknown unit {m['unit']!r} "
                "(use K, M, G, T or KiB, MiB, GiB, TiB; all binary)"
            )
        exact = Fraction(m["number"]) * _UNITS[unit]
        if exact.denominator != 1:
            raise SizeError(f"invalid size {text!r}: not a whole number of bytes")
        value = int(exact)
    if value <= 0:
        raise SizeError(f"invalid size {shown!r}: a size must be greater than zero")
    if value > MAX_SIZE:
        raise SizeError(f"invalid size {shown!r}: larger than the maximum of {MAX_SIZE} bytes")
    return value


def format_size(nbytes: int) -> str:
    """A short display form: ``67108864`` -> ``"64 MiB"``, ``1610612736`` -> ``"1.5 GiB"``.

    Exact multiples print without decimals; other sizes are rounded to two decimals (display only,
    never parsed back). Below 1 KiB the size prints in bytes.
    """
    for name, factor in _DISPLAY_UNITS:
        if nbytes >= factor:
            if nbytes % factor == 0:
                return f"{nbytes // factor} {name}"
            text = f"{nbytes / factor:.2f}".rstrip("0").rstrip(".")
            return f"{text} {name}"
    return f"{nbytes} B"
