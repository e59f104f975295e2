"""What commands print: JSON, tables, one-line notes on stderr."""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Sequence
from typing import Any


def emit_json(obj: Any) -> None:
    json.dump(obj, sys.stdout, indent=2, sort_keys=False, default=str)
    sys.stdout.write("\n")


# What str.splitlines() breaks on, and the other C0 controls: none may reach an error line raw.
_BREAKS = re.compile("[\x00-\x1f\x7f\x85\u2028\u2029]")


def one_line(text: str) -> str:
    """text with line breaks and control characters escaped (a name a user typed may hold
    them): an error is one line, whatever it quotes."""
    return _BREAKS.sub(lambda m: repr(m.group(0))[1:-1], text)


def error(message: str, hint: str | None = None) -> None:
    """The one line every error is: `qlaunch: error: MESSAGE (hint: WHAT TO DO)`."""
    tail = f" (hint: {hint})" if hint else ""
    print(f"qlaunch: error: {one_line(message + tail)}", file=sys.stderr)


def note(message: str) -> None:
    """A one-line remark on stderr that is not an error (e.g. why TCG was picked)."""
    print(f"qlaunch: {message}", file=sys.stderr)


def table(rows: list[dict[str, Any]], columns: Sequence[str]) -> None:
    # The header shows even with no rows, so an empty listing is visibly empty, not silent.
    widths = {c: max([len(c)] + [len(str(r.get(c, ""))) for r in rows]) for c in columns}
    print("  ".join(c.upper().ljust(widths[c]) for c in columns).rstrip())
    for r in rows:
        print("  ".join(str(r.get(c, "")).ljust(widths[c]) for c in columns).rstrip())
