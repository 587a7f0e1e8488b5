"""Parsing and printing byte sizes ("32MiB", "1.5GB", 4096)."""

from __future__ import annotations

import re
from typing import Union

from sllm_store.errors import InvalidArgumentError

_UNITS = {
    "": 1, "b": 1,
    "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2, "g": 1000**3, "gb": 1000**3,
    "t": 1000**4, "tb": 1000**4,
    "ki": 1024, "kib": 1024, "mi": 1024**2, "mib": 1024**2, "gi": 1024**3, "gib": 1024**3,
    "ti": 1024**4, "tib": 1024**4,
}

SizeLike = Union[int, str]


def parse_size(value: SizeLike) -> int:
    """Return a byte count from an int or a string such as ``"32MiB"``, ``"1.5GB"``, ``"4096"``.

    >>> parse_size("32MiB")
    33554432
    """
    if isinstance(value, bool):
        raise InvalidArgumentError(f"invalid size: {value!r}")
    if isinstance(value, int):
        if value < 0:
            raise InvalidArgumentError(f"size must not be negative: {value}")
        return value
    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]*)?)\s*([A-Za-z]*)\s*", str(value))
    if not m or m.group(2).lower() not in _UNITS:
        raise InvalidArgumentError(f"invalid size: {value!r} (examples: 4096, 32MiB, 1.5GB)")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def format_size(n: float) -> str:
    """Human-readable binary size: ``format_size(33554432) == '32.0 MiB'``."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")
