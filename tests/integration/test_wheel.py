"""The package as users get it: a wheel built from the checkout, installed in a fresh venv,
and run from a directory outside the checkout. Shipped profiles and the guest's init must come
with it (package data), or `qlaunch profiles` lists nothing and `run` cannot boot."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from importlib.metadata import distribution
from pathlib import Path

import pytest

pytestmark = pytest.mark.boot

REPO = Path(__file__).resolve().parents[2]
DEPENDENCIES = ("qemu.qmp", "psutil", "pyroute2")
NOT_SOURCE = (".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", ".*_cache")


def package_files() -> set[str]:
    """Every file of the qlaunch package in the checkout, as the wheel must name it (the
    profiles symlink followed, as setuptools does)."""
    root = REPO / "qlaunch"
    out = set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames[:] = [d for d in dirnames if d != "__pycache__"]
        for f in filenames:
            if not f.endswith((".pyc", ".pyo")):
                out.add((Path(dirpath) / f).relative_to(REPO).as_posix())
    return out


def link_dependencies(venv: Path, into: Path) -> None:
    """Make the dependencies importable in venv from this test run's own environment, without
    a download: their top-level packages and metadata, linked into a directory of their own
    (never qlaunch's editable install beside them), named by a .pth file."""
    into.mkdir()
    for name in DEPENDENCIES:
        dist = distribution(name)
        for top in {f.parts[0] for f in dist.files or [] if f.parts[0] != ".."}:
            src = Path(str(dist.locate_file(top)))
            if src.exists() and not (into / top).exists():
                (into / top).symlink_to(src)
    (site,) = venv.glob("lib/python3*/site-packages")
    (site / "qlaunch-test-deps.pth").write_text(f"{into}\n")


def test_wheel_in_a_fresh_venv_lists_and_runs_the_shipped_profiles(tmp_path: Path) -> None:
    # Built from a copy: an in-tree build would write build/ into the shared checkout.
    src = tmp_path / "src"
    shutil.copytree(REPO, src, symlinks=True, ignore=shutil.ignore_patterns(*NOT_SOURCE))
    # Offline with this environment's setuptools where it can build wheels by itself (70.1 and
    # later, or the `wheel` package beside it); else with pip's usual build isolation, which
    # fetches setuptools as pyproject.toml asks, as a user's `pip install .` does.
    build = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(tmp_path)]
    r = subprocess.run(
        [*build, "--no-build-isolation", "--no-index", str(src)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    if r.returncode != 0 and "invalid command 'bdist_wheel'" in r.stdout + r.stderr:
        r = subprocess.run([*build, str(src)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    (wheel,) = tmp_path.glob("qlaunch-*.whl")
    in_wheel = set(zipfile.ZipFile(wheel).namelist())
    missing = sorted(package_files() - in_wheel)
    assert not missing, f"not in the wheel: {missing}"
    assert {"qlaunch/profiles/default.toml", "qlaunch/boot/guest/init"} <= in_wheel

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    r = subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(venv / "bin/python")]
        + ["install", "-q", "--no-deps", "--no-index", str(wheel)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    link_dependencies(venv, tmp_path / "deps")

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["PATH"] = f"{venv / 'bin'}:{env.get('PATH', '')}"
    env["QLAUNCH_STATE"] = str(tmp_path / "state")

    def run(*argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            argv, cwd=elsewhere, env=env, capture_output=True, text=True, timeout=300
        )

    r = run(str(venv / "bin/python"), "-c", "import qlaunch; print(qlaunch.__file__)")
    assert r.returncode == 0 and r.stdout.startswith(str(venv)), (r.stdout, r.stderr)
    r = run(str(venv / "bin/qlaunch"), "profiles")
    assert r.returncode == 0, r.stderr
    listed = [line.split()[0] for line in r.stdout.splitlines()[1:] if line.strip()]
    shipped = sorted(p.stem for p in (REPO / "profiles").glob("*.toml"))
    assert "default" in listed and set(shipped) <= set(listed), r.stdout
    r = run(str(venv / "bin/qlaunch"), "run", "default", "--", "true")
    assert r.returncode == 0, r.stderr[-3000:]
    # A background VM: its supervisor (python -S -m qlaunch.vm.supervisor) finds the package
    # where the wheel put it, from a directory that is not the checkout.
    r = run(str(venv / "bin/qlaunch"), "start", "default", "--name", "wheel")
    assert r.returncode == 0, r.stderr[-3000:]
    r = run(str(venv / "bin/qlaunch"), "rm", "--force", "wheel")
    assert r.returncode == 0, r.stderr[-3000:]
