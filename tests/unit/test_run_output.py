"""`qlaunch run PROFILE -- CMD`'s output filter, pure: what reaches the user's stdout."""

from __future__ import annotations

from qlaunch.launch import run


def test_a_whole_line_is_not_held_back_only_a_cut_sequence_is() -> None:
    # The guest tty ends lines with CR LF. A write ending in a whole line must go out whole:
    # the command's last line is followed only by the status line, which is never written.
    assert run.PARTIAL_CONTROL.search(b"last line\r\n") is None
    assert run.PARTIAL_CONTROL.search(b"a CR cut from its LF\r") is not None
    assert run.PARTIAL_CONTROL.search(b"an escape cut short \x1b[2") is not None


def test_the_status_line_ends_the_output() -> None:
    seen: list[bytes] = []
    f = run.ConsoleFilter(seen.append)
    f.feed(b"hi\r\nQLAUNCH_EXIT=3\r\n[    1.0] reboot: Power down\r\n")
    f.flush()
    assert b"".join(seen) == b"hi\r\n"
    assert f.status == 3
