"""`qlaunch exec` on real Debian kernels under TCG: output, codes, shares, modules, failures."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

import qlaunch
from qlaunch.boot import assets, initramfs

pytestmark = pytest.mark.boot


def their_stderr(text: str) -> list[str]:
    """The command's stderr lines: what is left once qlaunch's own notes are taken out."""
    return [ln for ln in text.splitlines() if not ln.startswith("qlaunch: ")]


@pytest.fixture
def state_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    monkeypatch.setenv("QLAUNCH_STATE", str(tmp_path / "state"))
    return dict(os.environ)


def unpacked_package(asset: assets.AssetSet, root: Path, names: list[str]) -> Path:
    """What `dpkg-deb -x linux-image-*.deb ROOT` leaves, trimmed to a few modules: the kernel
    and its config under boot/, lib/modules/VERSION/kernel/..., and no modules.dep."""
    mods = root / "lib" / "modules" / asset.version
    for f in initramfs.resolve_modules(asset.modules, names):
        dest = mods / f.relative_to(asset.modules)
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(f, dest)
    for name in ("modules.builtin", "modules.order"):
        shutil.copyfile(asset.modules / name, mods / name)
    (root / "boot").mkdir()
    shutil.copyfile(asset.kernel, root / "boot" / f"vmlinuz-{asset.version}")
    shutil.copyfile(asset.config, root / "boot" / f"config-{asset.version}")
    return root


def test_exec_streams_apart_shares_and_loads_a_module(
    qlaunch_bin: list[str], tmp_path: Path, state_env: dict[str, str]
) -> None:
    # One boot of the generic kernel (it has 9p) from an unpacked-package tree: the command's
    # stdout and stderr come apart and in order, its exit code comes back, a file it writes
    # into --share is on the host, and a module from --modules loads. The tree has no fuse.ko
    # and virtiofs.ko, so the share falls back from virtiofs to 9p, and one line says why.
    asset = assets.require("x86_64-generic")
    pkg = unpacked_package(
        asset, tmp_path / "pkg", ["virtio_pci", "virtio_console", "9p", "9pnet_virtio", "dummy"]
    )
    work = tmp_path / "work"
    work.mkdir()
    script = (
        "for i in 1 2 3 4 5; do echo out $i; echo err $i >&2; done; "
        "modprobe dummy && grep -c '^dummy ' /proc/modules; "
        "echo written-in-the-guest > from-guest.txt; pwd; exit 42"
    )
    r = subprocess.run(
        [
            *qlaunch_bin,
            "exec",
            "--kernel",
            str(pkg / "boot" / f"vmlinuz-{asset.version}"),
            "--modules",
            str(pkg),
            "--module",
            "dummy",
            "--share",
            ".",
            "--",
            "sh",
            "-c",
            script,
        ],
        cwd=work,
        env=state_env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 42, r.stderr
    assert r.stdout.splitlines() == [*(f"out {i}" for i in range(1, 6)), "1", str(work)]
    assert their_stderr(r.stderr) == [f"err {i}" for i in range(1, 6)]
    why = [ln for ln in r.stderr.splitlines() if "over 9p, not virtiofs" in ln]
    assert why == [
        f"qlaunch: --share {work}: over 9p, not virtiofs: this kernel has no virtiofs: "
        f"CONFIG_FUSE_FS and CONFIG_VIRTIO_FS are not built into this kernel, and --modules "
        f"{pkg} has no fuse.ko, virtiofs.ko"
    ], r.stderr
    assert (work / "from-guest.txt").read_text() == "written-in-the-guest\n"
    # Nothing of the package's tree was changed (no depmod output written into it).
    assert not (pkg / "lib" / "modules" / asset.version / "modules.dep").exists()


def test_panic_is_reported_with_its_excerpt(tmp_path: Path, state_env: dict[str, str]) -> None:
    # A bare bzImage with no config and no modules beside it: its virtio drivers are modules,
    # so the guest finds no virtio console and output comes framed over the serial console.
    kernel = tmp_path / "bzImage"
    shutil.copyfile(assets.require("x86_64").kernel, kernel)
    r = qlaunch.exec(
        ["sh", "-c", "echo before; echo to-stderr >&2; echo c > /proc/sysrq-trigger"],
        kernel=kernel,
    )
    assert (r.code, r.verdict) == (121, "panic")
    assert "Kernel panic - not syncing: sysrq triggered crash" in r.excerpt[0]
    assert (r.stdout, r.stderr) == ("before\n", "to-stderr\n")
    assert r.message.startswith("kernel panic")
    assert any("framed over the serial console" in n for n in r.notes)
    assert r.console_log is not None and "sysrq triggered crash" in Path(r.console_log).read_text()
    assert str(tmp_path / "state") in r.console_log


def test_hanging_command_times_out_with_the_last_console_lines(
    qlaunch_bin: list[str], state_env: dict[str, str]
) -> None:
    r = subprocess.run(
        [
            *qlaunch_bin,
            "exec",
            "--timeout",
            "20",
            "--console",
            "--",
            "sh",
            "-c",
            "echo '<2>qlaunch-test: about to hang' > /dev/kmsg; echo started; sleep 1000",
        ],
        env=state_env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 124, r.stderr
    assert r.stdout == "started\n"
    assert "qlaunch: timed out after 20 s (--timeout): exit 124" in r.stderr
    report = r.stderr.split("timed out after", 1)[1]
    assert "console lines:" in report
    assert "qlaunch-test: about to hang" in report
