"""sparrow.sizes: every suffix is binary, garbage is refused with a message that names the input."""

from __future__ import annotations

import pytest

from sparrow.sizes import MAX_SIZE, SizeError, format_size, parse_size

KiB, MiB, GiB, TiB = 1024, 1024**2, 1024**3, 1024**4


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("4096", 4096),
        ("1", 1),
        ("512B", 512),
        ("512 b", 512),
        ("64MiB", 64 * MiB),
        ("64mib", 64 * MiB),
        ("64M", 64 * MiB),  # a bare letter is binary, as for qemu-img
        ("64m", 64 * MiB),
        ("1GiB", GiB),
        ("10G", 10 * GiB),
        ("1.5GiB", 3 * GiB // 2),
        ("0.5K", 512),
        (".5K", 512),
        ("2T", 2 * TiB),
        ("1TiB", TiB),
        ("1P", 1024**5),
        ("4KiB", 4 * KiB),
        ("  8 MiB  ", 8 * MiB),
        ("+3K", 3 * KiB),
        (4096, 4096),
        (MAX_SIZE, MAX_SIZE),
    ],
)
def test_good_sizes(text: str | int, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("", "expected a number"),
        ("abc", "expected a number"),
        ("MiB", "expected a number"),
        ("64 MiB x", "expected a number"),
        ("1e6", "expected a number"),
        ("64X", "unknown unit 'X'"),
        ("64MB", "ambiguous"),
        ("1GB", "ambiguous"),
        ("0", "greater than zero"),
        ("0MiB", "greater than zero"),
        ("-1", "greater than zero"),
        ("-64MiB", "greater than zero"),
        ("1.5", "whole number of bytes"),
        ("0.1K", "whole number of bytes"),
        ("1,5G", "expected a number"),
        ("0x10", "expected a number"),
        ("9999999P", "larger than the maximum"),
        (0, "greater than zero"),
        (-5, "greater than zero"),
        (True, "invalid size"),
    ],
)
def test_bad_sizes(text: str | int, fragment: str) -> None:
    with pytest.raises(SizeError) as info:
        parse_size(text)
    message = str(info.value)
    assert fragment in message
    assert repr(str(text)) in message or repr(text) in message  # the message names the input
    assert "\n" not in message


def test_size_error_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="invalid size"):
        parse_size("lots")


@pytest.mark.parametrize(
    ("nbytes", "shown"),
    [
        (1, "1 B"),
        (1023, "1023 B"),
        (1024, "1 KiB"),
        (64 * MiB, "64 MiB"),
        (3 * GiB // 2, "1.5 GiB"),
        (GiB + 1, "1 GiB"),  # rounded for display
        (10 * TiB, "10 TiB"),
        (1000 * 1000, "976.56 KiB"),
    ],
)
def test_format_size(nbytes: int, shown: str) -> None:
    assert format_size(nbytes) == shown


@pytest.mark.parametrize("nbytes", [512, 4096, 64 * MiB, 3 * GiB // 2, 7 * TiB])
def test_exact_sizes_round_trip(nbytes: int) -> None:
    assert parse_size(format_size(nbytes).replace(" ", "")) == nbytes
