"""`qlaunch exec`'s failure codes from a real Debian kernel doing the real thing under TCG.

Debian's kernels have no LKDTM, so a tiny module (qltest, below) is built against Debian's
`linux-headers-VERSION` package for the asset kernel's exact version (`make setup` installs it)
and packed with `--module`: `modprobe qltest action=warn|oops|hang|stall`. It is built once per
content (source, kernel version, the asset's modules) and kept under the asset cache. The
guest's own sysrq powers it off without a status.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from qlaunch.boot import assets

pytestmark = pytest.mark.boot

QLTEST_C = r"""// SPDX-License-Identifier: GPL-2.0
/* Kernel failures on purpose, for qlaunch's tests: modprobe qltest action=X [ms=N]. */
#include <linux/delay.h>
#include <linux/module.h>
#include <linux/rcupdate.h>

static char *action = "none";
module_param(action, charp, 0444);
static int ms = 5000;
module_param(ms, int, 0444);

static int *volatile nowhere;
static struct rcu_head head;

static void qltest_rcu_done(struct rcu_head *h) { }

static int __init qltest_init(void)
{
    pr_info("qltest: %s for %d ms\n", action, ms);
    if (!strcmp(action, "warn")) {
        WARN(1, "qltest: a warning on purpose\n");
    } else if (!strcmp(action, "oops")) {
        *nowhere = 1;
    } else if (!strcmp(action, "hang")) {
        /* msleep sleeps uninterruptibly: what the hung task detector looks for. */
        msleep(ms);
    } else if (!strcmp(action, "stall")) {
        /* Busy inside a read-side critical section with a grace period wanted: under
         * preempt=full the task is preempted there and holds the grace period up. */
        rcu_read_lock();
        call_rcu(&head, qltest_rcu_done);
        mdelay(ms);
        rcu_read_unlock();
    }
    return 0;
}
module_init(qltest_init);

MODULE_LICENSE("GPL");
MODULE_DESCRIPTION("qlaunch test module: warn, oops, hang, stall");
"""


def _digest(*parts: bytes) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(len(p).to_bytes(8, "little") + p)
    return h.hexdigest()[:16]


@pytest.fixture(scope="session")
def qltest_modules() -> Path:
    """A modules tree for `--modules`: the asset kernel's modules (linked) plus extra/qltest.ko,
    built here with the installed gcc against the asset kernel's own headers."""
    asset = assets.require("x86_64")
    headers = Path(f"/usr/src/linux-headers-{asset.version}")
    dep = (asset.modules / "modules.dep").read_bytes()
    tree = (
        assets.assets_root()
        / "test-modules"
        / f"qltest-{_digest(QLTEST_C.encode(), asset.version.encode(), dep)}"
    )
    if (tree / "extra" / "qltest.ko").is_file():
        return tree
    if not (headers / "Makefile").is_file() or shutil.which("gcc") is None:
        pytest.fail(
            f"building the test module needs gcc and linux-headers-{asset.version} "
            f"({headers} is missing): run `make setup`, which installs them"
        )
    tree.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".build-", dir=tree.parent))
    try:
        src = work / "src"
        src.mkdir()
        (src / "qltest.c").write_text(QLTEST_C)
        (src / "Kbuild").write_text("obj-m := qltest.o\n")
        r = subprocess.run(
            ["make", "-C", str(headers), f"M={src}", "modules"],
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert r.returncode == 0, f"building qltest.ko failed:\n{r.stdout[-2000:]}{r.stderr}"
        out = work / "tree"
        (out / "extra").mkdir(parents=True)
        subprocess.run(
            ["strip", "--strip-debug", "-o", str(out / "extra/qltest.ko"), str(src / "qltest.ko")],
            check=True,
        )
        # Relative, so the tree keeps working if the whole cache moves.
        (out / "kernel").symlink_to(os.path.relpath(asset.modules / "kernel", tree))
        for name in ("modules.builtin", "modules.order"):
            shutil.copyfile(asset.modules / name, out / name)
        (out / "modules.dep").write_bytes(dep + b"extra/qltest.ko:\n")
        try:
            out.rename(tree)
        except OSError:
            if not (tree / "extra" / "qltest.ko").is_file():
                raise  # not a concurrent build that got there first
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return tree


@pytest.fixture
def state_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, str]]:
    monkeypatch.setenv("QLAUNCH_STATE", str(tmp_path / "state"))
    yield dict(os.environ)


def exec_(
    qlaunch_bin: list[str], env: dict[str, str], *args: str, modules: Path | None = None
) -> subprocess.CompletedProcess[str]:
    mod = ["--modules", str(modules), "--module", "qltest"] if modules else []
    return subprocess.run(
        [*qlaunch_bin, "exec", "--kernel", "asset:x86_64", *mod, *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_warning_is_119_only_with_fail_on_warn(
    qlaunch_bin: list[str], state_env: dict[str, str], qltest_modules: Path
) -> None:
    cmd = ["--", "sh", "-c", "modprobe qltest action=warn && echo loaded"]
    r = exec_(qlaunch_bin, state_env, "--fail-on-warn", *cmd, modules=qltest_modules)
    assert r.returncode == 119, r.stderr[-3000:]
    assert "WARNING: CPU: 0 PID:" in r.stderr and "qltest_init" in r.stderr
    # The same kernel and module without the flag: the command's own status.
    r = exec_(qlaunch_bin, state_env, *cmd, modules=qltest_modules)
    assert (r.returncode, r.stdout) == (0, "loaded\n"), r.stderr[-3000:]


def test_guest_ending_without_a_status_is_120(
    qlaunch_bin: list[str], state_env: dict[str, str]
) -> None:
    r = exec_(
        qlaunch_bin,
        state_env,
        "--",
        "sh",
        "-c",
        "echo bye; echo o > /proc/sysrq-trigger; sleep 60",
    )
    assert r.returncode == 120, r.stderr[-3000:]
    assert r.stdout == "bye\n"
    assert "sysrq: Power Off" in r.stderr


def test_oops_is_122(
    qlaunch_bin: list[str], state_env: dict[str, str], qltest_modules: Path
) -> None:
    r = exec_(
        qlaunch_bin, state_env, "--", "modprobe", "qltest", "action=oops", modules=qltest_modules
    )
    assert r.returncode == 122, r.stderr[-3000:]
    assert "BUG: kernel NULL pointer dereference" in r.stderr


def test_hung_task_is_123(
    qlaunch_bin: list[str], state_env: dict[str, str], qltest_modules: Path
) -> None:
    # The detector's timeout is 120 s by default (CONFIG_DEFAULT_HUNG_TASK_TIMEOUT); writing
    # the sysctl wakes khungtaskd with the new one.
    script = "echo 1 > /proc/sys/kernel/hung_task_timeout_secs; modprobe qltest action=hang ms=5000"
    r = exec_(qlaunch_bin, state_env, "--", "sh", "-c", script, modules=qltest_modules)
    assert r.returncode == 123, r.stderr[-3000:]
    assert "INFO: task modprobe:" in r.stderr and "blocked for more than 1 seconds" in r.stderr


def test_rcu_stall_is_123(
    qlaunch_bin: list[str], state_env: dict[str, str], qltest_modules: Path
) -> None:
    # 3 s is the shortest stall timeout the kernel takes (CONFIG_RCU_CPU_STALL_TIMEOUT is 21).
    script = (
        "echo 3 > /sys/module/rcupdate/parameters/rcu_cpu_stall_timeout; "
        "modprobe qltest action=stall ms=8000"
    )
    r = exec_(
        qlaunch_bin,
        state_env,
        "--append",
        "preempt=full",
        "--",
        "sh",
        "-c",
        script,
        modules=qltest_modules,
    )
    assert r.returncode == 123, r.stderr[-3000:]
    assert "rcu: INFO: rcu_preempt detected stalls on CPUs/tasks" in r.stderr
