"""Byte counts written the way people write them (``4096``, ``64M``, ``4Gi``, ``1.5GiB``, ``64MB``):
parsed once for every command-line option that takes one. No torch import: the CLIs parse
before loading it.

Suffixes, case-insensitive: IEC ``Ki``/``Mi``/``Gi``/``Ti`` (with or without a trailing ``B``)
are powers of 1024; SI ``kB``/``MB``/``GB``/``TB`` are powers of 1000 (``64MB`` is 64,000,000
bytes); a bare ``K``/``M``/``G``/``T`` keeps this project's meaning, powers of 1024 (``64M`` is
64 MiB), as in ``ulimit`` and ``dd``.
"""

from __future__ import annotations

import re

__all__ = ["SIZE_HELP", "parse_size"]

SIZE_HELP = "sizes: 4096, 64Mi / 64MiB / 64M (x 1024^2), 64MB (x 1000^2); Ki Gi Ti, kB GB TB alike"

_POWERS = {"k": 1, "m": 2, "g": 3, "t": 4}


def _unit(suffix: str) -> int | None:
    s = suffix.lower()
    if s in ("", "b"):
        return 1
    if s[0] not in _POWERS:
        return None
    power = _POWERS[s[0]]
    if s[1:] in ("", "i", "ib"):
        return 1024**power
    if s[1:] == "b":
        return 1000**power
    return None


def parse_size(text: str) -> int:
    """Bytes from ``4096``, ``64M``, ``4Gi``, ``64MiB``, ``1.5GB``; raises ValueError otherwise."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    unit = _unit(match.group(2)) if match else None
    if match is None or unit is None:
        raise ValueError(f"expected a byte count such as 4096, 64Mi, 64MB or 1GiB, got {text!r}")
    return int(float(match.group(1)) * unit)
