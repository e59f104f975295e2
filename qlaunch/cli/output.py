"""What commands print: JSON, tables, one-line notes on stderr."""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from typing import Any


def emit_json(obj: Any) -> None:
    json.dump(obj, sys.stdout, indent=2, sort_keys=False, default=str)
    sys.stdout.write("\n")


def note(message: str) -> None:
    """A one-line remark on stderr that is not an error (e.g. why TCG was picked)."""
    print(f"qlaunch: {message}", file=sys.stderr)


def table(rows: list[dict[str, Any]], columns: Sequence[str]) -> None:
    # The header shows even with no rows, so an empty listing is visibly empty, not silent.
    widths = {c: max([len(c)] + [len(str(r.get(c, ""))) for r in rows]) for c in columns}
    print("  ".join(c.upper().ljust(widths[c]) for c in columns).rstrip())
    for r in rows:
        print("  ".join(str(r.get(c, "")).ljust(widths[c]) for c in columns).rstrip())
