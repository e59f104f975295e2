"""Console patterns and the scanner: failures, markers, framed output, the tail. No QEMU."""

from __future__ import annotations

import pytest

from qlaunch.boot import protocol
from qlaunch.testloop import console as con
from qlaunch.testloop.console import ConsoleScanner


@pytest.mark.parametrize(
    ("line", "kind", "code"),
    [
        ("[    1.486965] Kernel panic - not syncing: sysrq triggered crash", "panic", 121),
        ("Kernel panic - not syncing: VFS: Unable to mount root fs", "panic", 121),
        ("[    3.1] BUG: kernel NULL pointer dereference, address: 0000000000000000", "oops", 122),
        ("[    3.2] Oops: 0002 [#1] PREEMPT SMP NOPTI", "oops", 122),
        ("[    3.3] kernel BUG at mm/slub.c:379!", "oops", 122),
        ("[    3.4] general protection fault, probably for non-canonical address", "oops", 122),
        ("[    3.5] Unable to handle kernel paging request at virtual address 0", "oops", 122),
        ("[    3.6] Internal error: Oops: 96000045 [#1] SMP", "oops", 122),
        ("[    3.7] BUG: KASAN: use-after-free in foo+0x1/0x2", "oops", 122),
        ("[    3.8] UBSAN: shift-out-of-bounds in lib/x.c:1:2", "oops", 122),
        ("[    3.9] invalid opcode: 0000 [#1] SMP", "oops", 122),
        ("[   22.1] rcu: INFO: rcu_preempt self-detected stall on CPU", "hang", 123),
        ("[   22.2] rcu: INFO: rcu_sched detected stalls on CPUs/tasks:", "hang", 123),
        ("[  242.0] INFO: task sh:110 blocked for more than 120 seconds.", "hang", 123),
        ("[   30.0] watchdog: BUG: soft lockup - CPU#0 stuck for 26s! [sh:1]", "hang", 123),
        ("[    1.0][    T1] WARNING: CPU: 0 PID: 1 at kernel/x.c:10 f+0x1/0x2", "warning", 119),
    ],
)
def test_patterns(line: str, kind: str, code: int) -> None:
    p = con.match(line)
    assert p is not None and (p.kind, p.code) == (kind, code)


@pytest.mark.parametrize(
    "line",
    [
        "[    0.5] Run /init as init process",
        "[    0.6] virtio_blk virtio1: [vda] 2048 512-byte logical blocks",
        "qlaunch: insmod crc32c-intel.ko: No such device",
        "[    1.0] ACPI: bus type USB registered; BUG_ON is a macro",
        "[    2.0] audit: type=1400 something WARNING-like but not a warning",
    ],
)
def test_ordinary_lines_are_not_failures(line: str) -> None:
    assert con.match(line) is None


def test_codes_do_not_collide_and_stay_below_128() -> None:
    codes = [
        protocol.EXIT_BOOT_FAILURE,
        protocol.EXIT_WARNING,
        protocol.EXIT_NO_STATUS,
        protocol.EXIT_PANIC,
        protocol.EXIT_OOPS,
        protocol.EXIT_HANG,
        protocol.EXIT_TIMEOUT,
    ]
    assert len(set(codes)) == len(codes)
    assert protocol.EXIT_TIMEOUT == 124
    # 125 is left for --boot-failure-exit 125 (git bisect's "skip"), 126/127 for the shell.
    assert all(117 <= c < 125 for c in codes)


def feed_lines(s: ConsoleScanner, *lines: str) -> con.Chunk:
    return s.feed("".join(line + "\r\n" for line in lines).encode())


def test_panic_excerpt_runs_to_its_end_marker() -> None:
    s = ConsoleScanner()
    feed_lines(s, "[    0.9] ordinary", "QLAUNCH_INIT")
    feed_lines(
        s,
        "[    1.48] sysrq: Trigger a crash",
        "[    1.48] Kernel panic - not syncing: sysrq triggered crash",
        "[    1.48] CPU: 0 PID: 110 Comm: sh",
        "[    1.49] ---[ end Kernel panic - not syncing: sysrq triggered crash ]---",
        "[    1.50] after the end",
    )
    assert s.booted
    f = s.finding
    assert f is not None and f.complete and f.code == protocol.EXIT_PANIC
    assert f.excerpt[0].endswith("Kernel panic - not syncing: sysrq triggered crash")
    assert f.excerpt[-1].endswith("]---")
    assert "after the end" not in "".join(f.excerpt)


def test_first_failure_wins_and_cut_here_starts_the_excerpt() -> None:
    s = ConsoleScanner()
    feed_lines(
        s,
        "[    2.0] ------------[ cut here ]------------",
        "[    2.0] kernel BUG at fs/x.c:12!",
        "[    2.1] invalid opcode: 0000 [#1] SMP",
        "[    2.2] Kernel panic - not syncing: Fatal exception",
    )
    f = s.finding
    assert f is not None and f.pattern.title == "kernel BUG" and f.code == protocol.EXIT_OOPS
    assert "cut here" in f.excerpt[0]
    assert not f.complete
    assert len(f.excerpt) == 4


def test_warnings_fail_only_when_asked() -> None:
    line = "[    1.0] WARNING: CPU: 0 PID: 1 at kernel/x.c:10 f+0x1/0x2"
    quiet = ConsoleScanner()
    feed_lines(quiet, line)
    assert quiet.finding is None and quiet.warnings == [line]
    strict = ConsoleScanner(fail_on_warn=True)
    feed_lines(strict, line, "[    1.1] ---[ end trace 0000000000000000 ]---")
    assert strict.finding is not None and strict.finding.code == protocol.EXIT_WARNING
    assert strict.finding.complete


def test_framed_output_is_split_and_never_judged() -> None:
    s = ConsoleScanner()
    chunk = feed_lines(
        s,
        "QLAUNCH_O:Kernel panic - not syncing: just a test printing this",
        "QLAUNCH_E:  two  spaces kept ",
        "[    1.0] a kernel line",
        "QLAUNCH_O:",
    )
    assert chunk.stdout == b"Kernel panic - not syncing: just a test printing this\n\n"
    assert chunk.stderr == b"  two  spaces kept \n"
    assert chunk.console == b"[    1.0] a kernel line\n"
    assert s.finding is None
    assert list(s.tail) == ["[    1.0] a kernel line"]


def test_a_stream_end_marker_takes_the_newline_away() -> None:
    # The guest ends each framed stream with QLAUNCH_EOS right after its last byte: output
    # that ended in a newline gives an empty frame, output without one keeps its last line.
    s = ConsoleScanner()
    chunk = feed_lines(s, "QLAUNCH_O:whole", "QLAUNCH_O:QLAUNCH_EOS", "QLAUNCH_E:cutQLAUNCH_EOS")
    assert (chunk.stdout, chunk.stderr, chunk.console) == (b"whole\n", b"cut", b"")


def test_markers_are_read_and_hidden() -> None:
    s = ConsoleScanner()
    chunk = feed_lines(
        s,
        "QLAUNCH_INIT",
        "QLAUNCH_FALLBACK=no-ports",
        "QLAUNCH_NOTE=cannot mount 9p share qlshare0 on /src",
        "QLAUNCH_EXIT=42",
    )
    assert (s.booted, s.fallback, s.status) == (True, "no-ports", 42)
    assert s.notes == ["cannot mount 9p share qlshare0 on /src"]
    assert chunk.console == b""


def test_lines_split_across_reads_are_judged_whole() -> None:
    s = ConsoleScanner()
    assert s.feed(b"[ 1.0] Kernel pa").console == b""
    assert s.finding is None
    s.feed(b"nic - not syncing: x\r\nQLAUNCH_EX")
    assert s.finding is not None
    s.feed(b"IT=7")
    assert s.status is None
    s.flush()
    assert s.status == 7


def test_tail_keeps_the_last_30_lines_and_sees_a_halt() -> None:
    s = ConsoleScanner()
    feed_lines(s, *[f"line {i}" for i in range(100)])
    assert list(s.tail) == [f"line {i}" for i in range(70, 100)]
    assert not s.halted
    feed_lines(s, "[    4.0] reboot: System halted")
    assert s.halted
