"""`qlaunch run PROFILE --warm -- CMD` on real QEMU: the same output and status as a cold run,
fresh randomness and the right clock in every restored guest, an image made again when its
inputs change, nothing usable left by a build killed halfway, concurrent runs sharing one."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from qlaunch import paths

pytestmark = pytest.mark.boot

TIMEOUT = 300
KERNEL_LINE = re.compile(r"^\[ *\d+\.\d+\] .*\n", re.M)


@pytest.fixture
def warm_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    d = tmp_path / "warm"
    monkeypatch.setenv("QLAUNCH_WARM_DIR", str(d))
    yield d


@pytest.fixture(scope="module")
def shared_warm_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """One image per profile for the tests that only use them (a build is a whole boot)."""
    d = tmp_path_factory.mktemp("warm-shared")
    old = os.environ.get("QLAUNCH_WARM_DIR")
    os.environ["QLAUNCH_WARM_DIR"] = str(d)
    yield d
    if old is None:
        os.environ.pop("QLAUNCH_WARM_DIR", None)
    else:
        os.environ["QLAUNCH_WARM_DIR"] = old


def _run(qlaunch_bin: list[str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*qlaunch_bin, "run", *args], capture_output=True, text=True, timeout=TIMEOUT
    )


def _images(qlaunch_bin: list[str]) -> list[dict[str, object]]:
    r = subprocess.run(
        [*qlaunch_bin, "warm", "list", "--json"], capture_output=True, text=True, check=True
    )
    out: list[dict[str, object]] = json.loads(r.stdout)
    return out


@pytest.mark.parametrize("profile", ["aarch64-virt", "default"])
def test_warm_run_equals_cold(qlaunch_bin: list[str], shared_warm_dir: Path, profile: str) -> None:
    cmd = ["--", "sh", "-c", 'echo "two  words"; echo to-stderr >&2; uname -m; exit 3']
    cold = _run(qlaunch_bin, profile, *cmd)
    first = _run(qlaunch_bin, profile, "--warm", *cmd)  # builds the image, then restores it
    again = _run(qlaunch_bin, profile, "--warm", *cmd)
    assert cold.returncode == first.returncode == again.returncode == 3, again.stderr
    # The cold boot's own kernel lines (x86's "MP-BIOS bug") go by in the warm image's build.
    want = KERNEL_LINE.sub("", cold.stdout)
    assert "two  words\nto-stderr\n" in want
    assert first.stdout == again.stdout == want
    assert "building the warm image" in first.stderr
    # A restore says what a cold run says (the accelerator's note), nothing more.
    assert again.stderr == cold.stderr
    assert len(_images(qlaunch_bin)) >= 1


def test_restored_guests_differ_in_randomness_and_know_the_time(
    qlaunch_bin: list[str], shared_warm_dir: Path
) -> None:
    cmd = [
        "aarch64-virt",
        "--warm",
        "--",
        "sh",
        "-c",
        "cat /proc/sys/kernel/random/uuid; head -c 16 /dev/urandom | od -An -tx1; date +%s",
    ]
    _run(qlaunch_bin, *cmd)  # the image, if the test before did not make it
    outs = []
    for _ in range(2):
        t0 = time.time()
        r = _run(qlaunch_bin, *cmd)
        t1 = time.time()
        assert r.returncode == 0, r.stderr
        uuid, rand, clock = r.stdout.strip().splitlines()
        assert t0 - 2 <= int(clock) <= t1 + 2, (t0, clock, t1)
        outs.append((uuid, rand))
    assert outs[0][0] != outs[1][0]
    assert outs[0][1] != outs[1][1]


def test_changed_argv_or_kernel_makes_a_new_image(
    qlaunch_bin: list[str], warm_dir: Path, tmp_path: Path
) -> None:
    kernel = tmp_path / "Image"
    shutil.copy(paths.cache_dir() / "assets" / "aarch64" / "kernel", kernel)
    base = ["aarch64-virt", "--warm", "--set", f"boot.kernel={kernel}"]
    r = _run(qlaunch_bin, *base, "--", "true")
    assert r.returncode == 0 and "building" in r.stderr, r.stderr
    r = _run(qlaunch_bin, *base, "--", "echo", "same inputs")
    assert r.returncode == 0 and "building" not in r.stderr, r.stderr
    assert r.stdout.strip() == "same inputs"
    assert len(_images(qlaunch_bin)) == 1
    # Another argv (more memory): another image.
    r = _run(qlaunch_bin, *base, "--set", "machine.memory=384M", "--", "true")
    assert r.returncode == 0 and "building" in r.stderr, r.stderr
    assert len(_images(qlaunch_bin)) == 2
    # The same kernel file with other content (bytes past the image are ignored by the boot).
    with open(kernel, "ab") as f:
        f.write(b"\0" * 4096)
    r = _run(qlaunch_bin, *base, "--", "true")
    assert r.returncode == 0 and "building" in r.stderr, r.stderr
    assert len(_images(qlaunch_bin)) == 3


def test_build_killed_halfway_leaves_nothing_a_run_uses(
    qlaunch_bin: list[str], warm_dir: Path
) -> None:
    proc = subprocess.Popen(
        [*qlaunch_bin, "run", "aarch64-virt", "--warm", "--", "echo", "ok"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + TIMEOUT
        qemu: list[psutil.Process] = []
        # Mid-build: its directory exists and QEMU runs the guest's boot.
        while not qemu:
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline
            if list(warm_dir.glob(".build-*")):
                qemu = [c for c in psutil.Process(proc.pid).children() if "qemu" in c.name()]
            time.sleep(0.05)
        time.sleep(1.0)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    # QEMU goes with it (a zombie counts as gone: nothing here reaps orphans).
    _, alive = psutil.wait_procs(qemu, timeout=10)
    assert all(p.status() == psutil.STATUS_ZOMBIE for p in alive), alive
    assert _images(qlaunch_bin) == []
    assert not [p for p in warm_dir.iterdir() if not p.name.startswith(".") and p.is_dir()]
    # A later run builds a whole image (and sweeps the dead build away).
    r = _run(qlaunch_bin, "aarch64-virt", "--warm", "--", "echo", "ok")
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr
    assert len(_images(qlaunch_bin)) == 1
    assert not list(warm_dir.glob(".build-*"))


def test_concurrent_warm_runs_share_one_image(qlaunch_bin: list[str], warm_dir: Path) -> None:
    procs = [
        subprocess.Popen(
            [*qlaunch_bin, "run", "aarch64-virt", "--warm", "--", "echo", f"run {i}"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(3)
    ]
    results = [p.communicate(timeout=TIMEOUT) + (p.returncode,) for p in procs]
    for i, (out, err, code) in enumerate(results):
        assert code == 0, err
        assert out.strip() == f"run {i}"
    assert sum("building" in err for _, err, _ in results) == 1
    assert len(_images(qlaunch_bin)) == 1


def test_warm_refuses_what_cannot_be_warm(qlaunch_bin: list[str], warm_dir: Path) -> None:
    r = _run(qlaunch_bin, "vexpress-a9", "--warm", "--", "true")
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1 and "vexpress-a9" in r.stderr
    r = _run(qlaunch_bin, "aarch64-virt", "--warm")
    assert r.returncode == 2 and "needs a command" in r.stderr
    assert not warm_dir.exists()
