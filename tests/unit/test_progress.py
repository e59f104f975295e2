"""The progress line (qlaunch.cli.output.Progress) on a real terminal (a pty), and its silence
on anything else: a pipe, a file, --json."""

from __future__ import annotations

import io
import os
import select
import time
from collections.abc import Iterator

import pytest

from qlaunch.cli import output


class Tty:
    """A pseudo-terminal: the follower is the stream Progress writes; read() gets what a
    terminal would have shown, as bytes."""

    def __init__(self) -> None:
        self.leader, follower = os.openpty()
        self.stream = os.fdopen(follower, "w")

    def read(self) -> str:
        out = b""
        while select.select([self.leader], [], [], 0.2)[0]:
            out += os.read(self.leader, 65536)
        return out.decode()

    def close(self) -> None:
        self.stream.close()
        os.close(self.leader)


@pytest.fixture
def tty() -> Iterator[Tty]:
    t = Tty()
    try:
        yield t
    finally:
        t.close()


def test_one_line_rewritten_in_place(tty: Tty) -> None:
    p = output.Progress("web: saving", stream=tty.stream, tick=0)
    assert p.enabled
    p.update(64 << 20, 256 << 20)
    p.update(128 << 20, 256 << 20)
    p.update(3 << 20)  # no total: bytes so far
    p.percent(42.0)
    shown = tty.read()
    # Every redraw starts at the line's beginning; nothing goes to a new line meanwhile.
    assert "\n" not in shown
    draws = shown.split("\r")[1:]
    assert draws[0].startswith("qlaunch: web: saving  0.0 s")
    assert "qlaunch: web: saving   25%  64.0 MiB of 256.0 MiB  " in draws[1]
    assert "qlaunch: web: saving   50%  128.0 MiB of 256.0 MiB  " in draws[2]
    assert draws[3].startswith("qlaunch: web: saving  3.0 MiB  ")
    assert draws[4].startswith("qlaunch: web: saving   42%  ")
    assert draws[4].rstrip().endswith(" s")
    # A shorter line blanks what the longer one left on the screen.
    assert len(draws[3]) == len(draws[2].rstrip())
    p.close()
    # Closing clears the line, so an error message starts on a clean one.
    assert tty.read() == "\r" + " " * len(draws[-1].rstrip()) + "\r"


def test_steps_keep_their_lines_and_notes_go_above(tty: Tty) -> None:
    with output.Progress("fetching", stream=tty.stream, tick=0) as p:
        p.step("x86_64: downloading")
        p.note("using TCG")
        p.step("x86_64: unpacking")
        p.step("x86_64: ready")
    lines = tty.read().replace("\r\n", "\n").split("\n")
    final = [ln.split("\r")[-1].rstrip() for ln in lines]
    # What the terminal shows at the end, line by line: the first label was replaced by the
    # first step, the note took the step's place and the step went on below it, each step
    # kept its line with its time, and the last one stays (all went well).
    assert "fetching" in lines[0] and "fetching" not in final[0]
    assert final[0] == "qlaunch: using TCG"
    assert final[1].startswith("qlaunch: x86_64: downloading  ")
    assert final[2].startswith("qlaunch: x86_64: unpacking  ")
    assert final[3].startswith("qlaunch: x86_64: ready  ")
    assert final[4] == ""


def test_the_clock_moves_while_nothing_reports(tty: Tty) -> None:
    # A loaded host may not run the ticker thread on time: wait for its draws (a clock that
    # never moves still fails, after 10 s), not for a fixed span. One read at a time: read()
    # drains until the terminal is quiet, which it never is while the clock ticks.
    shown = b""
    with output.Progress("apt-get download", stream=tty.stream, tick=0.1):
        deadline = time.monotonic() + 10
        time.sleep(0.45)
        while shown.count(b"\r") < 4 and time.monotonic() < deadline:
            if select.select([tty.leader], [], [], 0.2)[0]:
                shown += os.read(tty.leader, 65536)
    draws = [d for d in (shown.decode() + tty.read()).split("\r") if d.strip()]
    assert len(draws) >= 3, draws
    assert draws[0].startswith("qlaunch: apt-get download  0.0 s")
    times = [float(d.split()[-2]) for d in draws]
    assert times == sorted(times) and times[-1] >= 0.2, draws


def test_width_is_the_terminals(tty: Tty) -> None:
    import fcntl
    import struct
    import termios

    fcntl.ioctl(tty.stream.fileno(), termios.TIOCSWINSZ, struct.pack("HHHH", 24, 40, 0, 0))
    p = output.Progress("x" * 100, stream=tty.stream, tick=0)
    p.close()
    draws = tty.read().split("\r")
    assert len(draws[1]) == 39  # a wrapped line could not be rewritten


def test_silent_when_not_a_terminal_or_json(tty: Tty) -> None:
    buf = io.StringIO()
    r, w = os.pipe()
    pipe = os.fdopen(w, "w")
    for stream, enabled in ((buf, None), (pipe, None), (tty.stream, False)):
        p = output.Progress("saving", stream=stream, enabled=enabled, tick=0.01)
        assert not p.enabled
        p.update(1, 2)
        p.step("next")
        time.sleep(0.05)
        p.close()
    pipe.close()
    assert buf.getvalue() == ""
    assert os.read(r, 100) == b""
    os.close(r)
    assert tty.read() == ""
    # Notes still reach a pipe or a log: they are not progress.
    p = output.Progress("saving", stream=buf)
    p.note("web: saved to web.state")
    p.close()
    assert buf.getvalue() == "qlaunch: web: saved to web.state\n"
