"""The exec engine's verdicts against a fake QEMU: no emulation, each scenario in well under a
second of work. The fake speaks the same wiring as QEMU does: console on stdout, the virtio
console ports as `-chardev file,path=/proc/self/fd/N`."""

from __future__ import annotations

import json
import sys
import textwrap
import time
from pathlib import Path

import pytest

from qlaunch.errors import QemuError
from qlaunch.testloop import driver as testloop

FAKE_QEMU = textwrap.dedent(
    """\
    #!{python}
    import os, sys, time
    argv = sys.argv[1:]
    ports = {{}}
    for i, a in enumerate(argv):
        if a == "-chardev" and argv[i + 1].startswith("file,id=ql"):
            opts = dict(kv.split("=", 1) for kv in argv[i + 1].split(",")[1:])
            ports[opts["id"][2:]] = opts["path"]
    def port(name, data):
        with open(ports[name], "w") as f:
            f.write(data)
    def con(text):
        sys.stdout.write(text.replace("\\n", "\\r\\n"))
        sys.stdout.flush()
    scenario = os.environ["FAKE_SCENARIO"]
    if scenario == "qemu-error":
        sys.stderr.write("qemu-system-x86_64: -device nope: 'nope' is not a valid device\\n")
        sys.exit(1)
    con("[    0.1] booting\\n")
    if scenario == "no-boot":
        sys.exit(0)
    con("QLAUNCH_INIT\\n")
    if scenario == "ok":
        port("stdout", "out line\\n")
        port("stderr", "err line\\n")
        port("status", "7\\n")
        con("QLAUNCH_EXIT=7\\n[    1.0] reboot: Power down\\n")
    elif scenario == "status-then-linger":
        # A guest slow to power off: qlaunch has all it needs once the status is in.
        port("stdout", "done\\n")
        port("status", "5\\n")
        time.sleep(60)
    elif scenario == "framed":
        con("QLAUNCH_FALLBACK=no-virtio-console-driver\\n")
        con("QLAUNCH_O:framed out\\nQLAUNCH_E:framed err\\nQLAUNCH_EXIT=3\\n")
    elif scenario == "oops":
        port("stdout", "before\\n")
        con("[    1.0] BUG: kernel NULL pointer dereference, address: 0000000000000000\\n")
        con("[    1.0] Oops: 0002 [#1] SMP\\n[    1.1] ---[ end trace 0000000000000000 ]---\\n")
        time.sleep(60)
    elif scenario == "silent":
        con("[    1.0] the last thing it said\\n")
        time.sleep(60)
    """
)


@pytest.fixture
def fake(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An asset cache with a fake x86_64 set, a fake QEMU, and a profile that uses both."""
    cache = tmp_path / "cache"
    root = cache / "assets" / "x86_64"
    (root / "modules").mkdir(parents=True)
    (root / "modules" / "modules.dep").write_text("")
    (root / "modules" / "modules.builtin").write_text(
        "kernel/drivers/virtio/virtio_pci.ko\nkernel/drivers/char/virtio_console.ko\n"
    )
    head = bytearray(0x300)
    head[0x202:0x206] = b"HdrS"
    (root / "kernel").write_bytes(bytes(head))
    (root / "config").write_text("CONFIG_VIRTIO_PCI=y\nCONFIG_VIRTIO_CONSOLE=y\n")
    (root / "busybox").write_bytes(b"\x7fELF busybox")
    manifest = {"format": 1, "set": "x86_64", "arch": "x86_64", "kernel_version": "6.1.0-t"}
    (root / "manifest.json").write_text(json.dumps(manifest))
    qemu = tmp_path / "fake-qemu"
    qemu.write_text(FAKE_QEMU.format(python=sys.executable))
    qemu.chmod(0o755)
    profile = tmp_path / "fake.toml"
    profile.write_text(
        f'[machine]\narch = "x86_64"\naccel = "tcg"\n'
        f'[boot]\nkernel = "asset:x86_64/kernel"\ninitrd = "qlaunch"\n'
        f'[qemu]\nbinary = "{qemu}"\n'
    )
    monkeypatch.setenv("QLAUNCH_CACHE", str(cache))
    monkeypatch.setenv("QLAUNCH_STATE", str(tmp_path / "state"))
    return profile


def run(
    profile: Path, scenario: str, monkeypatch: pytest.MonkeyPatch, **kw: object
) -> testloop.Result:
    monkeypatch.setenv("FAKE_SCENARIO", scenario)
    spec = testloop.ExecSpec(cmd=("true",), profile=str(profile), **kw)  # type: ignore[arg-type]
    return testloop.run_spec(spec, testloop.CaptureSink())


def test_status_and_output_from_the_ports(fake: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    r = run(fake, "ok", monkeypatch)
    assert (r.code, r.verdict, r.command_status) == (7, "exit", 7)
    assert (r.stdout, r.stderr) == ("out line\n", "err line\n")
    assert "QLAUNCH" not in r.console and "booting" in r.console
    assert r.report() == []


def test_qemu_is_ended_once_the_status_is_in(fake: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    start = time.monotonic()
    r = run(fake, "status-then-linger", monkeypatch)
    assert (r.code, r.verdict, r.stdout) == (5, "exit", "done\n")
    assert time.monotonic() - start < 20  # not the guest's 60 s, nor a grace period


def test_framed_output_and_the_fallback_note(fake: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    r = run(fake, "framed", monkeypatch)
    assert (r.code, r.stdout, r.stderr) == (3, "framed out\n", "framed err\n")
    assert any("no-virtio-console-driver" in n for n in r.notes)


def test_oops_ends_the_run_with_its_excerpt(fake: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    r = run(fake, "oops", monkeypatch, timeout=60)
    assert (r.code, r.verdict) == (122, "oops")
    assert r.excerpt[0].endswith("BUG: kernel NULL pointer dereference, address: 0000000000000000")
    assert r.excerpt[-1].endswith("---[ end trace 0000000000000000 ]---")
    assert r.stdout == "before\n"
    assert r.report()[0] == "kernel BUG on the console: exit 122"


def test_watchdog_gives_124_and_the_last_lines(fake: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # 0.1 s of silence, times ten under TCG.
    r = run(fake, "silent", monkeypatch, watchdog=0.1)
    assert (r.code, r.verdict) == (124, "timeout")
    assert r.message == "no output for 1 s (watchdog, x10 under TCG): exit 124"
    assert r.console_tail[-1].endswith("the last thing it said")
    assert "  [    1.0] the last thing it said" in r.report()


def test_a_kernel_that_never_reaches_the_init_is_a_boot_failure(
    fake: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    r = run(fake, "no-boot", monkeypatch)
    assert (r.code, r.verdict) == (118, "boot-failure")
    assert r.message.startswith("the kernel did not boot to qlaunch's init")
    assert run(fake, "no-boot", monkeypatch, boot_failure_exit=125).code == 125


def test_qemu_refusing_its_argv_is_a_qemu_error(
    fake: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAKE_SCENARIO", "qemu-error")
    # No console output at all, and QEMU's own error: not a boot failure but QEMU's failure.
    with pytest.raises(QemuError, match="'nope' is not a valid device"):
        testloop.run_spec(
            testloop.ExecSpec(cmd=("true",), profile=str(fake)), testloop.CaptureSink()
        )


def test_kernel_for_another_arch_is_refused_naming_both(
    fake: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from qlaunch.errors import UsageError

    image = tmp_path / "Image"
    head = bytearray(0x100)
    head[0x38:0x3C] = b"ARM\x64"
    image.write_bytes(bytes(head))
    with pytest.raises(UsageError, match=r"is an arm64 Image, but profile fake.*is x86_64"):
        testloop.run_spec(
            testloop.ExecSpec(cmd=("true",), kernel=str(image), profile=str(fake)),
            testloop.CaptureSink(),
        )
