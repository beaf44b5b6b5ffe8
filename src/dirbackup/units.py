"""Human-readable sizes and rates, and parsing sizes and durations given by users."""

from __future__ import annotations

import re

_UNITS = ("B", "KiB", "MiB", "GiB", "TiB", "PiB")
_POWER = {"K": 1, "M": 2, "G": 3, "T": 4}
_SIZE = re.compile(r"([0-9]+(?:\.[0-9]+)?)\s*(?:([KMGT])(iB|B)?|(B))?", re.IGNORECASE)
MIN_RATE = 64 << 10
"""The least bandwidth limit accepted, 64 KiB/s: below it a 10 GiB disk takes two days."""
_EXAMPLES = "e.g. 100MiB, 50MB, 1G"


def human(n: float) -> str:
    """1536 -> '1.5 KiB'; whole bytes below 1 KiB."""
    for unit in _UNITS:
        if abs(n) < 1024 or unit == _UNITS[-1]:
            return f"{int(n)} B" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def parse_size(text: str) -> int:
    """A size given by a user, in bytes; ValueError if it is none.

    '1048576' and '512B' are bytes; 'K', 'M', 'G', 'T' alone are binary
    (2^10.., as qemu-img reads them); 'KiB', 'MiB', 'GiB', 'TiB' binary too;
    'KB', 'MB', 'GB', 'TB' decimal (10^3..).  The prefix letter may be lower
    case ('k'); 'B' may not ('Mb' reads as megabits: refused)."""
    m = _SIZE.fullmatch(text.strip())
    if not m or (m.group(3) or m.group(4) or "B").endswith("b"):
        raise ValueError(f"not a size: {text!r} ({_EXAMPLES})")
    number, prefix, suffix = float(m.group(1)), m.group(2), m.group(3)
    if prefix is None:
        return int(number)
    base = 1000 if suffix == "B" else 1024
    return int(number * base ** _POWER[prefix.upper()])


def parse_rate(text: str) -> int:
    """A bandwidth limit given by a user, in bytes per second (0: none);
    ValueError with one line if it is none or absurd.

    A size as parse_size reads it, optionally followed by '/s'.  A bare number
    other than 0 is refused: vzdump reads it as KiB/s, most tools as bytes/s.
    A rate below MIN_RATE is refused too."""
    body = text.strip()
    body = body[:-2] if body.lower().endswith("/s") else body
    try:
        rate = parse_size(body)
    except ValueError:
        raise ValueError(f"not a size: {text!r} ({_EXAMPLES}, per second)") from None
    if rate == 0:
        return 0
    if body.strip().replace(".", "").isdigit():
        raise ValueError(
            f"{text!r} has no unit: give one, {_EXAMPLES} (a bare number is KiB/s to vzdump, "
            "bytes/s to others)"
        )
    if rate < MIN_RATE:
        raise ValueError(
            f"{text!r} is below the least rate accepted, {MIN_RATE >> 10} KiB/s "
            "(a 10 GiB disk would take two days; 0: no limit)"
        )
    return rate


def parse_seconds(value: str | float) -> float:
    """A finite, non-negative number of seconds ('2.5', 60) or ValueError."""
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        seconds = -1.0
    if not 0 <= seconds < float("inf"):
        raise ValueError(f"not a number of seconds >= 0: {value!r}")
    return seconds
