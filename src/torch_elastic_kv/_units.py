"""Byte counts written the way people write them (``4096``, ``64M``, ``1.5GiB``): parsed once
for every command-line option that takes one. No torch import: the CLIs parse before loading it."""

from __future__ import annotations

import re

__all__ = ["parse_size"]

_SIZE_UNITS = {
    "": 1,
    "b": 1,
    "k": 1024,
    "kb": 1000,
    "kib": 1024,
    "m": 1024**2,
    "mb": 1000**2,
    "mib": 1024**2,
    "g": 1024**3,
    "gb": 1000**3,
    "gib": 1024**3,
}


def parse_size(text: str) -> int:
    """Bytes from ``4096``, ``64M``, ``64MiB``, ``1.5GB``; raises ValueError otherwise."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    if not match or match.group(2).lower() not in _SIZE_UNITS:
        raise ValueError(f"expected a byte count such as 4096, 64MiB or 1GiB, got {text!r}")
    return int(float(match.group(1)) * _SIZE_UNITS[match.group(2).lower()])
