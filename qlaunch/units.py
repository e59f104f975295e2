"""Sizes, the one way: "512M", "1.5G", "4096", "64KiB" in, bytes out, and back for messages.

Binary units throughout (1G = 1024M), as QEMU and qemu-img read them.
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation

from qlaunch.errors import UsageError

MAX_SIZE = 2**63 - 1  # QEMU and qemu-img keep sizes in an int64
UNITS = {"": 0, "K": 10, "M": 20, "G": 30, "T": 40, "P": 50, "E": 60}
_SIZE_RE = re.compile(r"(\d+(?:\.\d*)?|\.\d+)\s*([KMGTPE]?)(?:(?<=[KMGTPE])I?B|B)?", re.IGNORECASE)


def parse_size(s: str | int, default_unit: str = "") -> int:
    """Bytes from a human size. A number without a unit is in default_unit (bytes unless
    said otherwise: memory is in M, as QEMU's -m reads it)."""
    if isinstance(s, bool):
        raise UsageError(f"bad size {s!r}", hint="a number with a unit, like 512M or 2G")
    if isinstance(s, int):
        value = Decimal(s)
        unit = default_unit
    else:
        m = _SIZE_RE.fullmatch(s.strip())
        if not m:
            raise UsageError(
                f"bad size {s!r}",
                hint="a number of bytes, or a number with K, M, G, T, P or E (binary: 1G = 1024M)",
            )
        try:
            value = Decimal(m.group(1))
        except InvalidOperation as e:  # pragma: no cover - the regex only lets numbers through
            raise UsageError(f"bad size {s!r}") from e
        unit = m.group(2) or default_unit
    value *= 1 << UNITS[unit.upper()]
    if value != value.to_integral_value():
        raise UsageError(
            f"size {s!r} is not a whole number of bytes",
            hint="a fraction must come out to whole bytes: 1.5G is fine, 1.3K is not",
        )
    if value < 0:
        raise UsageError(f"size {s!r} is negative")
    if value > MAX_SIZE:
        raise UsageError(f"size {s!r} is too large", hint="sizes stop at 8 EiB")
    return int(value)


def format_size(n: int) -> str:
    """The shortest exact binary spelling of n bytes ("1G", "1536M", "4097"), for messages."""
    for unit in ("E", "P", "T", "G", "M", "K"):
        shift = UNITS[unit]
        if n and n % (1 << shift) == 0:
            return f"{n >> shift}{unit}"
    return str(n)


def is_power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def round_up_pow2(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1)."""
    return 1 if n <= 1 else 1 << (n - 1).bit_length()
