"""README's "Exit codes" section, read as data: the meaning of each code, and the codes each
command group documents. Shared by the test that keeps the section true and the CLI fuzz test
that holds every command to it."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[2] / "README.md"


def section() -> str:
    text = README.read_text()
    start = text.index("## Exit codes\n")
    return text[start : text.index("\n## ", start + 1)]


def _rows(table_head: str) -> list[list[str]]:
    text = section()
    lines = text[text.index(table_head) :].splitlines()[2:]
    rows = []
    for line in lines:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in line.strip().strip("|").split("|")])
    return rows


def meanings() -> dict[str, str]:
    """code (as written: "2", "128+N") -> meaning."""
    return {r[0]: r[1] for r in _rows("| code | meaning |")}


def groups() -> dict[str, tuple[set[str], set[int], bool]]:
    """group -> (commands, codes, whether the guest command's status passes through)."""
    out = {}
    for group, commands, codes in _rows("| group | commands | codes |"):
        nums: set[int] = set()
        guest = False
        for part in (p.strip() for p in codes.split(",")):
            if part == "guest":
                guest = True
            elif ".." in part:
                lo, hi = part.split("..")
                nums |= set(range(int(lo), int(hi) + 1))
            else:
                nums.add(int(part))
        out[group] = (set(re.findall(r"`([^`]+)`", commands)), nums, guest)
    return out


def codes_for(command: str) -> set[int]:
    """The exit codes README documents for a top-level command, signals aside."""
    for commands, codes, _ in groups().values():
        if command in commands:
            return codes
    raise KeyError(command)
