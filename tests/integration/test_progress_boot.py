"""Progress as a user sees it: `save`, `restore` and `assets fetch` with stderr on a terminal
(a pty) draw one line rewritten in place; with stderr on a pipe, or with --json, no progress
line at all, only the usual notes."""

from __future__ import annotations

import os
import re
import select
import subprocess
from pathlib import Path

import pytest
from vmlab import QLAUNCH, ok, row, vmroot  # noqa: F401


def on_tty(*args: str, timeout: float = 300) -> tuple[int, str, str]:
    """`qlaunch ARGS` with stderr on a pseudo-terminal (stdout a pipe, as in `$(...)`);
    returns (exit code, stdout, what the terminal got)."""
    leader, follower = os.openpty()
    try:
        proc = subprocess.Popen(
            [*QLAUNCH, *args], stdout=subprocess.PIPE, stderr=follower, stdin=subprocess.DEVNULL
        )
        os.close(follower)
        follower = -1
        got = b""
        while True:
            ready = select.select([leader], [], [], timeout)[0]
            if not ready:
                proc.kill()
                raise AssertionError(f"qlaunch {args} hung; the terminal got {got!r}")
            try:
                chunk = os.read(leader, 65536)
            except OSError:  # EIO: every writer has closed the follower
                break
            if not chunk:
                break
            got += chunk
        assert proc.stdout is not None
        out = proc.stdout.read().decode()
        return proc.wait(timeout), out, got.decode()
    finally:
        os.close(leader)
        if follower >= 0:
            os.close(follower)


def render(screen: str) -> list[str]:
    """What a terminal shows in the end: \r goes back to the line's start, text overwrites."""
    lines: list[list[str]] = [[]]
    col = 0
    for ch in screen:
        if ch == "\r":
            col = 0
        elif ch == "\n":
            lines.append([])
            col = 0
        else:
            line = lines[-1]
            line[col : col + 1] = [ch]
            col += 1
    return ["".join(ln).rstrip() for ln in lines]


def redraws(screen: str, label: str) -> list[str]:
    return [d for d in screen.replace("\r\n", "\n").split("\r") if d.startswith(label)]


@pytest.mark.boot
def test_save_and_restore_show_progress_on_a_terminal_only(vmroot: Path) -> None:  # noqa: F811
    ok("start", "default", "--name", "prog", "--set", "machine.memory=384M")
    saved = vmroot / "prog.qlsave"

    code, _, screen = on_tty("save", "prog", str(saved))
    assert code == 0, screen
    draws = redraws(screen, "qlaunch: prog: saving")
    assert draws, screen
    # guest RAM done of its size (the 384M and QEMU's few other RAM blocks), and the time;
    # the last redraw is the whole RAM
    ram = re.compile(r"  +(\d+)%  ([\d.]+) MiB of (38[4-9]\.\d) MiB  [\d.]+ s")
    seen = [m.groups() for d in draws if (m := ram.search(d))]
    assert seen and seen[-1][0] == "100" and seen[-1][1] == seen[-1][2], draws
    # In the end the terminal shows the note alone: the progress line made way and was cleared.
    shown = render(screen)
    assert shown[0].startswith("qlaunch: prog: saved to") and shown[1:] == [""], shown

    code, out, screen = on_tty("restore", str(saved))
    assert code == 0 and out.strip() == "prog", screen
    draws = redraws(screen, f"qlaunch: restoring {saved}")
    assert draws and any("%" in d for d in draws), screen
    assert "restored from" in screen
    assert row("prog")["state"] == "running"

    # Not a terminal: no \r anywhere, the notes as always.
    again = vmroot / "again.qlsave"
    r = ok("save", "prog", str(again))
    assert "\r" not in r.stderr and "saving" not in r.stderr and "saved to" in r.stderr
    r = ok("restore", str(again))
    assert "\r" not in r.stderr and "restoring" not in r.stderr and "restored from" in r.stderr

    # --json on a terminal: the JSON and no progress line.
    code, out, screen = on_tty("save", "prog", str(vmroot / "third.qlsave"), "--json")
    assert code == 0 and '"was_running": true' in out
    assert "\r" not in screen.replace("\r\n", "\n") and "saving" not in screen


def test_assets_fetch_steps_on_a_terminal(vmroot: Path) -> None:  # noqa: F811
    # The x86_64 set is in the cache (make setup fetched it): one step, "present", kept.
    code, _, screen = on_tty("assets", "fetch", "--arch", "x86_64")
    assert code == 0, screen
    shown = render(screen)
    assert shown[-1] == "" and shown[-2].startswith("qlaunch: x86_64: present ("), shown
    assert shown[-2].endswith(" s")  # the step keeps its line, with its time
    r = ok("assets", "fetch", "--arch", "x86_64")
    assert r.stderr.startswith("qlaunch: x86_64: present (") and "\r" not in r.stderr
