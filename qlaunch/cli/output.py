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


def _size(n: float) -> str:
    """Bytes for a person, to a tenth: 512 B, 3.2 MiB, 1.5 GiB (not exact; units does exact)."""
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift:
            return f"{n / (1 << shift):.1f} {unit}"
    return f"{int(n)} B"


def _elapsed(seconds: float) -> str:
    s = int(seconds)
    return f"{seconds:.1f} s" if s < 60 else f"{s // 60}:{s % 60:02d}"


class Progress:
    """Long work on a terminal: one line on stderr, rewritten in place (\\r) with what is being
    done, how far (percent of a known total, else bytes so far) and the time since it began;
    redrawn each second meanwhile, so a step that reports nothing still shows it is alive.

        with output.Progress("web: saving", enabled=not args.json) as p:
            migrate.save(..., progress=p.update if p.enabled else None)

    Nothing at all when stderr is not a terminal or enabled is False (--json): logs and pipes
    get only what the command prints anyway. Library code never prints: it takes a callback
    (progress=...) that the CLI points here.
    """

    def __init__(
        self,
        what: str,
        *,
        stream: Any = None,
        enabled: bool | None = None,
        tick: float = 1.0,
    ) -> None:
        import threading
        import time

        self.stream = stream if stream is not None else sys.stderr
        try:
            tty = bool(self.stream.isatty())
        except (AttributeError, ValueError):
            tty = False
        self.enabled = tty and (enabled is None or enabled)
        self.what = what
        self.done: float | None = None
        self.total: float | None = None
        self._clock = time.monotonic
        self.started = self.step_started = self._clock()
        self._shown = 0  # characters on the line now
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._ticker: threading.Thread | None = None
        self._stepped = False  # step() was called: its line is kept when the next begins
        if self.enabled:
            self._draw()
        if self.enabled and tick > 0:
            self._ticker = threading.Thread(target=self._tick, args=(tick,), daemon=True)
            self._ticker.start()

    # -- what callers call

    def update(self, done: float | None = None, total: float | None = None) -> None:
        """How far: done of total (percent), or done bytes when total is None or 0."""
        if not self.enabled:
            return
        with self._lock:
            self.done = done
            self.total = total or None
            self._draw()

    def percent(self, pct: float) -> None:
        """How far, in percent (qemu-img's reports)."""
        self.update(pct, 100.0)

    def step(self, what: str) -> None:
        """A new step: the one before keeps its line (with its time); this one is drawn."""
        if not self.enabled:
            return
        with self._lock:
            if self._stepped:
                self._finish_line()
            self._stepped = True
            self.what = what
            self.done = self.total = None
            self.step_started = self._clock()
            self._draw()

    def note(self, message: str) -> None:
        """A one-line remark (output.note) above the progress line, which goes on below it."""
        with self._lock:
            if self._shown:
                self._write("\r" + " " * self._shown + "\r")
                self._shown = 0
            print(f"qlaunch: {message}", file=self.stream, flush=True)
            if self.enabled and not self._stop.is_set():
                self._draw()

    def close(self, keep: bool = False) -> None:
        """End: keep the last line (a step's result), or clear it (an error message must not
        land on its end)."""
        self._stop.set()
        if self._ticker is not None:
            self._ticker.join()
            self._ticker = None
        with self._lock:
            if self._shown and keep:
                self._finish_line()
            elif self._shown:
                self._write("\r" + " " * self._shown + "\r")
            self._shown = 0

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, exc_type: object, *rest: object) -> None:
        # Steps that all went through keep the last one's line; anything else is cleared.
        self.close(keep=exc_type is None and self._stepped)

    # -- drawing

    def line(self) -> str:
        t = _elapsed(self._clock() - self.step_started)
        if self.done is None:
            return f"qlaunch: {self.what}  {t}"
        if self.total:
            pct = 100.0 * min(self.done / self.total, 1.0)
            if self.total == 100.0:
                return f"qlaunch: {self.what}  {pct:3.0f}%  {t}"
            sizes = f"{_size(self.done)} of {_size(self.total)}"
            return f"qlaunch: {self.what}  {pct:3.0f}%  {sizes}  {t}"
        return f"qlaunch: {self.what}  {_size(self.done)}  {t}"

    def _width(self) -> int:
        import os

        try:
            columns = os.get_terminal_size(self.stream.fileno()).columns
        except (AttributeError, OSError, ValueError):
            columns = 0
        # 0: a terminal that does not say (a bare pty); the classic 80 then.
        return max(columns - 1, 20) if columns > 0 else 79

    def _draw(self) -> None:
        # Cut to the terminal's width: a line that wraps cannot be rewritten with \r.
        text = one_line(self.line())[: self._width()]
        self._write("\r" + text + " " * max(self._shown - len(text), 0))
        self._shown = len(text)

    def _finish_line(self) -> None:
        self._draw()
        self._write("\n")
        self._shown = 0

    def _write(self, s: str) -> None:
        try:
            self.stream.write(s)
            self.stream.flush()
        except (OSError, ValueError):
            self.enabled = False

    def _tick(self, every: float) -> None:
        while not self._stop.wait(every):
            with self._lock:
                if self.enabled:
                    self._draw()
