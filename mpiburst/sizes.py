"""Parse and format byte sizes the way HPC tools write them (``4k``, ``47008``, ``8G``, ``1.5TiB``)."""

from __future__ import annotations

import re

from .errors import ConfigError

_UNITS = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40, "p": 1 << 50}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgtp]?)(?:i?b)?\s*$", re.IGNORECASE)


def parse_size(text: str | int, what: str = "size") -> int:
    """Return the number of bytes in ``text`` (binary units: ``1k`` is 1024 bytes).

    Raises
    ------
    ConfigError
        If ``text`` is not a non-negative size.
    """
    if isinstance(text, int):
        if text < 0:
            raise ConfigError(f"{what} must not be negative (got {text}).")
        return text
    m = _SIZE.match(str(text))
    if not m:
        raise ConfigError(f"{what} {text!r} is not a size; write a number with an optional unit, e.g. 4k, 47008, 1m, 8G.")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def format_size(n: float) -> str:
    """Return ``n`` bytes as a short human-readable string (``1.5 GiB``)."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"
