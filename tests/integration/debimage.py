"""A real Debian 12 disk for tests that need a whole OS (guest agent, ssh, firmware): built
once with `qlaunch image build` and cached by the recipe's content, so a change to the
recipe builds a new one and an unchanged recipe never builds twice (also across runs).

    base = debian_image("x86_64", "bios")      # read-only: give each VM an overlay
    disk = overlay(base, tmp_path / "disk.qcow2")

$QLAUNCH_TEST_DEBIAN_X86_64_BIOS (and so on for other arches and firmware) names an image to
use instead, e.g. while the recipe is being changed.

`make test-images` builds the ones the suite boots before pytest starts (the aarch64 one runs
under qemu-user for about 10 minutes), so no test waits on a build and a failed build is said
once, plainly, not as every image test's error:

    python tests/integration/debimage.py x86_64/bios x86_64/uefi aarch64/uefi
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
QLAUNCH = str(Path(sys.executable).parent / "qlaunch")
RECIPE = [
    REPO / "qlaunch" / "storage" / "build.py",
    REPO / "qlaunch" / "cli" / "commands" / "imagebuild.py",
]
BUILD_TIMEOUT = 3600  # aarch64 under qemu-user took over 30 minutes on a loaded host


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


# Every image the suite boots, in the order `make test-images` builds them.
SUITE = [("x86_64", "bios"), ("x86_64", "uefi"), ("aarch64", "uefi")]


def debian_image(arch: str = "x86_64", firmware: str = "bios", *, show: bool = False) -> Path:
    """The cached image for arch and firmware, built first if the recipe changed. Several
    test processes asking at once build it once (a lock beside the cache). show: the build's
    own messages go to this process's stderr as they come (a failure is said there too)."""
    given = os.environ.get(f"QLAUNCH_TEST_DEBIAN_{arch.upper()}_{firmware.upper()}")
    if given:
        return Path(given)  # a developer's own image (made with image build), as it is
    d = cache_dir()
    out = d / f"debian12-{arch}-{firmware}-{recipe_key(arch, firmware)}.qcow2"
    lock_path = d / f".{out.name}.lock"
    with open(lock_path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not out.exists():
            for old in d.glob(f"debian12-{arch}-{firmware}-*.qcow2"):
                old.unlink()  # an older recipe's image: never used again
            for old in d.glob(f".debian12-{arch}-{firmware}-*.qcow2.lock"):
                if old.name != lock_path.name:
                    old.unlink(missing_ok=True)
            proc = subprocess.Popen(
                [QLAUNCH, "image", "build", "debian", "--arch", arch, "--firmware", firmware]
                + [str(out), "--json"],
                stdout=subprocess.DEVNULL,
                stderr=None if show else subprocess.PIPE,
                text=True,
            )
            try:
                _, err = proc.communicate(timeout=BUILD_TIMEOUT)
            except BaseException:
                # SIGTERM, not subprocess's SIGKILL: the build then stops mmdebstrap and
                # undoes its mounts and loop devices (a killed one leaves them all behind).
                proc.terminate()
                proc.communicate(timeout=300)
                raise
            tail = "" if show else err[-3000:]
            assert proc.returncode == 0, f"image build failed ({proc.returncode}):\n{tail}"
            os.chmod(out, 0o444)  # a base: VMs write to overlays only
    return out


def overlay(base: Path, path: Path) -> Path:
    """A qcow2 overlay on base, for one VM to write to."""
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(base), "-F", "qcow2", str(path)],
        check=True,
    )
    return path


def main(argv: list[str]) -> int:
    """Build (or find in the cache) each ARCH/FIRMWARE named, saying how long each took."""
    for item in argv or [f"{a}/{f}" for a, f in SUITE]:
        arch, _, firmware = item.partition("/")
        t0 = time.monotonic()
        try:
            path = debian_image(arch, firmware or "bios", show=True)
        except (AssertionError, subprocess.TimeoutExpired) as e:
            print(f"qlaunch: error: test image {item}: {e}", file=sys.stderr)
            return 1
        secs = time.monotonic() - t0
        how = f"built in {secs:.0f} s" if secs > 5 else "cached"
        print(f"test image {item}: {path} ({how})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
