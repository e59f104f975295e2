"""Reading a guest's serial console: kernel failure patterns, qlaunch's markers, the last lines.

Pure: bytes in, findings out, no clock and no I/O, so every pattern is unit-tested. The patterns
are the ones kernel CI tools (LAVA, syzkaller) match, plus the shapes of the die() reports of
s390 and mips, which differ from x86's, ARM's and powerpc's. Exit codes live here beside the
patterns they belong to, so the README's table and the code cannot drift apart.
"""

from __future__ import annotations

import re
from collections import deque
from dataclasses import dataclass, field

from qlaunch.boot.protocol import (
    EXIT_HANG,
    EXIT_OOPS,
    EXIT_PANIC,
    EXIT_RE,
    EXIT_WARNING,
    FALLBACK_RE,
    FRAME_END,
    FRAME_ERR,
    FRAME_OUT,
    HALT_RE,
    INIT_MARKER,
    NOTE_RE,
)

TAIL_LINES = 30
EXCERPT_MAX = 60

# printk's "[    1.234567]" time stamp and optional "[    T1]" caller id.
_PREFIX_RE = re.compile(r"^(?:\[\s*\d+\.\d+\])?(?:\[\s*[CT]\d+\])?\s*")
# A kernel message that cut into a framed line before its newline: printk's exact stamp, not at
# the start of the line's text (seen when a command writes, then crashes the kernel at once).
_CUT_IN_RE = re.compile(rb"(?<=.)\[ *\d+\.\d{6}\] ")


@dataclass(frozen=True)
class Pattern:
    kind: str  # panic, oops, hang, warning
    title: str  # what the report calls it
    regex: re.Pattern[str]
    code: int


def _p(kind: str, title: str, regex: str, code: int) -> Pattern:
    return Pattern(kind, title, re.compile(regex), code)


# Order matters where one line could match two: the first wins.
PATTERNS: tuple[Pattern, ...] = (
    _p("panic", "kernel panic", r"Kernel panic - not syncing", EXIT_PANIC),
    _p("hang", "RCU stall", r"rcu_(?:preempt|sched|bh) (?:self-)?detected stall", EXIT_HANG),
    _p("hang", "RCU stall", r"rcu: INFO: .*detected stalls? on CPU", EXIT_HANG),
    _p("hang", "hung task", r"INFO: task .* blocked for more than", EXIT_HANG),
    _p("hang", "soft lockup", r"BUG: soft lockup", EXIT_HANG),
    _p("hang", "workqueue lockup", r"BUG: workqueue lockup", EXIT_HANG),
    _p("oops", "kernel BUG", r"kernel BUG at", EXIT_OOPS),
    _p("oops", "KASAN report", r"BUG: KASAN:", EXIT_OOPS),
    _p("oops", "KCSAN report", r"BUG: KCSAN:", EXIT_OOPS),
    _p("oops", "KFENCE report", r"BUG: KFENCE:", EXIT_OOPS),
    _p("oops", "kernel BUG", r"^BUG: ", EXIT_OOPS),
    _p("oops", "oops", r"\bOops(?: -|:)", EXIT_OOPS),
    _p("oops", "oops", r"Unable to handle kernel", EXIT_OOPS),
    _p("oops", "oops", r"general protection fault", EXIT_OOPS),
    _p("oops", "oops", r"^Internal error: ", EXIT_OOPS),
    _p("oops", "oops", r"Unhandled fault", EXIT_OOPS),
    _p("oops", "oops", r"^invalid opcode: ", EXIT_OOPS),
    _p("oops", "oops", r"^divide error: ", EXIT_OOPS),
    _p("oops", "UBSAN report", r"^UBSAN: ", EXIT_OOPS),
    # s390's die(): "illegal operation: 0001 ilc:1 [#1] SMP" and its kin, one per program check
    # ("Oops: 0004 ilc:3 [#1]" is caught above).
    _p("oops", "oops", r"^\w[\w -]{2,60}: [0-9a-f]{4} ilc:\d \[#\d+\]", EXIT_OOPS),
    # mips's die(): "Oops[#1]:", "Kernel bug detected[#1]:", "Reserved instruction in kernel
    # code[#1]:"..., the reason and a counter alone on their line.
    _p("oops", "oops", r"^[A-Z][A-Za-z ,-]{2,60}\[#\d+\]:\s*$", EXIT_OOPS),
    _p("warning", "kernel WARNING", r"^WARNING: ", EXIT_WARNING),
)

_CUT_HERE = re.compile(r"-+\[ cut here \]-+")
_END_RE = re.compile(r"---\[ end (?:trace|Kernel panic)")


def strip_prefix(line: str) -> str:
    """A console line without printk's time stamp and caller id."""
    return _PREFIX_RE.sub("", line, count=1)


def match(line: str, *, warnings: bool = True) -> Pattern | None:
    """The first failure pattern a console line matches (WARNING only if warnings is set)."""
    text = strip_prefix(line)
    for p in PATTERNS:
        if p.kind == "warning" and not warnings:
            continue
        if p.regex.search(text):
            return p
    return None


@dataclass
class Finding:
    """A failure seen on the console, with the lines that tell about it."""

    pattern: Pattern
    excerpt: list[str]
    complete: bool = False  # its trace has ended (or is as long as we keep)

    @property
    def code(self) -> int:
        return self.pattern.code

    @property
    def title(self) -> str:
        return self.pattern.title


@dataclass
class Chunk:
    """What one piece of console output means for the user."""

    console: bytes = b""  # kernel console text to show (markers and framed lines removed)
    stdout: bytes = b""  # the command's stdout, when it comes framed on the console
    stderr: bytes = b""


@dataclass
class ConsoleScanner:
    """Feeds on console bytes; keeps the tail, the markers, and the first failure.

    Lines are judged only once complete. Framed lines (QLAUNCH_O:, QLAUNCH_E:) are the command's
    output, never matched against failure patterns, so a test that prints "Kernel panic" does not
    fail itself.
    """

    fail_on_warn: bool = False
    tail: deque[str] = field(default_factory=lambda: deque(maxlen=TAIL_LINES))
    booted: bool = False
    status: int | None = None  # from the QLAUNCH_EXIT marker
    fallback: str | None = None
    halted: bool = False
    finding: Finding | None = None
    warnings: list[str] = field(default_factory=list)  # WARNING lines seen without --fail-on-warn
    notes: list[str] = field(default_factory=list)  # the guest init's complaints (QLAUNCH_NOTE=)
    lines_seen: int = 0
    _partial: bytes = b""

    def feed(self, data: bytes) -> Chunk:
        out = Chunk()
        data = self._partial + data
        pieces = data.split(b"\n")
        self._partial = pieces.pop()
        console: list[bytes] = []
        so: list[bytes] = []
        se: list[bytes] = []
        for raw in pieces:
            self._line(raw.rstrip(b"\r"), console, so, se)
        out.console = b"".join(console)
        out.stdout = b"".join(so)
        out.stderr = b"".join(se)
        return out

    def flush(self) -> Chunk:
        """The last line, when the console ended without a newline."""
        if not self._partial:
            return Chunk()
        return self.feed(b"\n")

    def _line(self, raw: bytes, console: list[bytes], so: list[bytes], se: list[bytes]) -> None:
        for marker, sink in ((FRAME_OUT, so), (FRAME_ERR, se)):
            i = raw.find(marker)
            if i >= 0:
                body = raw[i + len(marker) :]
                cut = _CUT_IN_RE.search(body)
                kernel = body[cut.start() :] if cut else b""
                body = body[: cut.start()] if cut else body
                sink.append(body[: -len(FRAME_END)] if body.endswith(FRAME_END) else body + b"\n")
                if raw[:i].strip():
                    # A kernel message that the frame interrupted keeps its part.
                    self._judge(raw[:i].decode(errors="replace"), console, raw[:i])
                if kernel:
                    self._judge(kernel.decode(errors="replace"), console, kernel)
                return
        self._judge(raw.decode(errors="replace"), console, raw)

    def _judge(self, line: str, console: list[bytes], raw: bytes) -> None:
        self.lines_seen += 1
        if INIT_MARKER in line and not self.booted:
            self.booted = True
            return
        m = EXIT_RE.search(line)
        if m:
            self.status = int(m.group(1))
            return
        m = FALLBACK_RE.search(line)
        if m:
            self.fallback = m.group(1)
            return
        m = NOTE_RE.search(line)
        if m:
            self.notes.append(m.group(1).strip())
            return
        console.append(raw + b"\n")
        previous = self.tail[-1] if self.tail else ""
        self.tail.append(line)
        if HALT_RE.search(line):
            self.halted = True
        if self.finding is not None:
            f = self.finding
            if not f.complete:
                f.excerpt.append(line)
                if _END_RE.search(line) or len(f.excerpt) >= EXCERPT_MAX:
                    f.complete = True
            return
        p = match(line)
        if p is None:
            return
        if p.kind == "warning" and not self.fail_on_warn:
            self.warnings.append(line)
            return
        excerpt = [previous, line] if _CUT_HERE.search(previous) else [line]
        self.finding = Finding(p, excerpt, complete=bool(_END_RE.search(line)))
