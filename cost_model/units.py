"""Byte-size parsing and formatting shared by the cost model, the policy CLI and the runtime.

Decision: a suffix with ``i`` is binary (``KiB MiB GiB TiB`` = 2**10 ...), a suffix without it is
decimal (``KB MB GB TB`` = 10**3 ...), as in IEC 80000-13. A bare letter (``K M G T``) is read as
binary, as ``docker`` and ``numfmt --from=auto`` do for memory limits. A plain number is bytes.
"""

from __future__ import annotations

import re

_UNITS: dict[str, int] = {
    "": 1, "b": 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
    "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40,
}
_PATTERN = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([a-zA-Z]*)\s*$")


def parse_bytes(text: str) -> int:
    """Parse ``"512MiB"``, ``"16GB"``, ``"2GiB"``, ``"1.5G"`` or ``"1024"`` into a byte count.

    Raises ValueError naming the text when it is not a non-negative size with a known unit.
    """
    match = _PATTERN.match(str(text))
    if match is None:
        raise ValueError(f"cannot parse byte size {text!r}; expected e.g. 512MiB, 16GB, 2GiB")
    number, unit = float(match.group(1)), match.group(2).lower()
    if unit not in _UNITS:
        raise ValueError(f"unknown byte unit {match.group(2)!r} in {text!r}; "
                         f"known: B, KB, MB, GB, TB, KiB, MiB, GiB, TiB, K, M, G, T")
    return int(round(number * _UNITS[unit]))


def format_bytes(num_bytes: float) -> str:
    """Human-readable binary size, e.g. ``format_bytes(3 * 2**30) == "3.00 GiB"``."""
    value = float(num_bytes)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(value) < 1024:
            return f"{value:.2f} {unit}" if unit != "B" else f"{int(value)} B"
        value /= 1024
    return f"{value:.2f} TiB"
