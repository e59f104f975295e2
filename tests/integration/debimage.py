"""A real Debian 12 disk for tests that need a whole OS (guest agent, ssh, firmware): built
once with `qlaunch image build` and cached by the recipe's content, so a change to the
recipe builds a new one and an unchanged recipe never builds twice (also across runs).

    base = debian_image("x86_64", "bios")      # read-only: give each VM an overlay
    disk = overlay(base, tmp_path / "disk.qcow2")

$QLAUNCH_TEST_DEBIAN_X86_64_BIOS (and so on for other arches and firmware) names an image to
use instead, e.g. while the recipe is being changed.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
QLAUNCH = str(Path(sys.executable).parent / "qlaunch")
RECIPE = [
    REPO / "qlaunch" / "storage" / "build.py",
    REPO / "qlaunch" / "cli" / "commands" / "imagebuild.py",
]
BUILD_TIMEOUT = 1800


def cache_dir() -> Path:
    base = os.environ.get("QLAUNCH_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "qlaunch"
    )
    d = Path(base) / "test-images"
    d.mkdir(parents=True, exist_ok=True)
    return d


def recipe_key(arch: str, firmware: str) -> str:
    h = hashlib.sha256(f"{arch}/{firmware}\n".encode())
    for p in RECIPE:
        h.update(p.read_bytes())
    return h.hexdigest()[:16]


def debian_image(arch: str = "x86_64", firmware: str = "bios") -> Path:
    """The cached image for arch and firmware, built first if the recipe changed. Several
    test processes asking at once build it once (a lock beside the cache)."""
    given = os.environ.get(f"QLAUNCH_TEST_DEBIAN_{arch.upper()}_{firmware.upper()}")
    if given:
        return Path(given)  # a developer's own image (made with image build), as it is
    d = cache_dir()
    out = d / f"debian12-{arch}-{firmware}-{recipe_key(arch, firmware)}.qcow2"
    with open(d / f".{out.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not out.exists():
            for old in d.glob(f"debian12-{arch}-{firmware}-*.qcow2"):
                old.unlink()  # an older recipe's image: never used again
            r = subprocess.run(
                [QLAUNCH, "image", "build", "debian", "--arch", arch, "--firmware", firmware]
                + [str(out), "--json"],
                capture_output=True,
                text=True,
                timeout=BUILD_TIMEOUT,
            )
            assert r.returncode == 0, f"image build failed ({r.returncode}):\n{r.stderr[-3000:]}"
            os.chmod(out, 0o444)  # a base: VMs write to overlays only
    return out


def overlay(base: Path, path: Path) -> Path:
    """A qcow2 overlay on base, for one VM to write to."""
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(base), "-F", "qcow2", str(path)],
        check=True,
    )
    return path
