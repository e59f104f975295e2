"""Disks as a guest sees them, on real QEMU under TCG with Debian's cloud kernel.

Three boots in all:
- one guest reads four disks converted raw -> qcow2 -> vdi -> vmdk and sees the same bytes;
- a VM started in the background (`qlaunch start`) makes a file system on a disk its profile
  creates (`size`), writes files, syncs and waits; meanwhile a second writer is refused, by
  qlaunch's check (naming the VM) and by QEMU's own lock; then QEMU is killed with SIGKILL, and
  `qemu-img check` finds the image clean;
- a guest boots again on that disk and reads the files back, writes one more and powers off;
  in the same boot it reads the cloud-init seed from its CD-ROM and writes to a throwaway disk
  whose base stays unchanged and which leaves no file behind.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest

from qlaunch.config import profile
from qlaunch.launch import argv as argvmod
from qlaunch.launch import host, resolve
from qlaunch.storage import image

pytestmark = pytest.mark.boot

MiB = 1 << 20
CHAIN = ("raw", "qcow2", "vdi", "vmdk")


def run_guest(
    qlaunch_bin: list[str], sets: list[str], script: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    args = [*qlaunch_bin, "run", "default"]
    for s in sets:
        args += ["--set", s]
    return subprocess.run(
        [*args, "--", "sh", "-c", script],
        capture_output=True,
        text=True,
        timeout=180,
        stdin=subprocess.DEVNULL,
        env=env,
    )


def test_converted_formats_look_identical_to_the_guest(
    qlaunch_bin: list[str], tmp_path: Path
) -> None:
    data = os.urandom(4 * MiB)
    (tmp_path / "d.raw").write_bytes(data)
    for src, dst in zip(CHAIN, CHAIN[1:], strict=False):
        r = subprocess.run(
            [*qlaunch_bin, "image", "convert", "-q", "-O", dst]
            + [str(tmp_path / f"d.{src}"), str(tmp_path / f"d.{dst}")],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert r.returncode == 0, r.stderr
    sets = []
    for i, fmt in enumerate(CHAIN):
        assert image.info(tmp_path / f"d.{fmt}").format == fmt
        sets += [f"disk.{i}.path={tmp_path / f'd.{fmt}'}", f"disk.{i}.readonly=true"]
    script = (
        "for d in vda vdb vdc vdd; do "
        'echo "$d $(blockdev --getsize64 /dev/$d) $(md5sum </dev/$d | cut -d" " -f1)"; done'
    )
    r = run_guest(qlaunch_bin, sets, script)
    assert r.returncode == 0, r.stderr
    want = hashlib.md5(data).hexdigest()
    seen = [line.split() for line in r.stdout.splitlines() if line.startswith("vd")]
    assert seen == [[d, str(4 * MiB), want] for d in ("vda", "vdb", "vdc", "vdd")], r.stdout


@dataclass
class Background:
    """A VM `qlaunch start` runs, with its state in a directory of this test's own."""

    qlaunch: list[str]
    env: dict[str, str]
    name: str

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*self.qlaunch, *args], capture_output=True, text=True, timeout=120, env=self.env
        )

    def pid(self) -> int:
        vms = {v["name"]: v for v in json.loads(self.cli("list", "--json").stdout)}
        return int(vms[self.name]["pid"])

    def expect(self, prefix: str, timeout: float = 120) -> str:
        """The first console line that starts with prefix."""
        log = Path(self.env["QLAUNCH_STATE"]) / self.name / "console.log"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = log.read_text(errors="replace") if log.exists() else ""
            for line in text.splitlines():
                if line.strip().startswith(prefix):
                    return line.strip()
            time.sleep(0.2)
        raise AssertionError(f"no {prefix!r} on the console of {self.name}: {text[-2000:]}")


@pytest.fixture
def background(qlaunch_bin: list[str]) -> Iterator[Background]:
    # A short state root: socket paths must stay under 108 bytes.
    root = Path(tempfile.mkdtemp(prefix="ql-disk-"))
    vm = Background(
        qlaunch_bin, {**os.environ, "QLAUNCH_STATE": str(root)}, f"holder-{uuid.uuid4().hex[:6]}"
    )
    try:
        yield vm
    finally:
        # Whatever happened, no QEMU of this test outlives it.
        for proc in psutil.process_iter(["cmdline"]):
            if any(str(root) in arg for arg in proc.info["cmdline"] or []):
                with contextlib.suppress(psutil.NoSuchProcess):
                    proc.kill()
        vm.cli("rm", "--force", vm.name)
        shutil.rmtree(root, ignore_errors=True)


def test_disk_lifecycle_lock_crash_safety_seed_and_throwaway(
    qlaunch_bin: list[str], tmp_path: Path, background: Background
) -> None:
    disk = tmp_path / "data.qcow2"
    name = background.name

    # Boot 1: the profile's size creates the disk; the guest writes and syncs, then waits.
    write = (
        "mke2fs /dev/vda >/dev/null && mount -t ext2 /dev/vda /mnt && "
        "echo 'written by boot one' >/mnt/hello.txt && "
        "dd if=/dev/urandom of=/mnt/blob bs=64k count=32 2>/dev/null && "
        'sync && echo "READY $(md5sum </mnt/blob | cut -d" " -f1)" && sleep 600'
    )
    r = background.cli(
        "start",
        "default",
        "--name",
        name,
        "--set",
        f"disk.0.path={disk}",
        "--set",
        "disk.0.size=64M",
        "--",
        "sh",
        "-c",
        write,
    )
    assert r.returncode == 0, r.stderr
    assert f"created {disk} (qcow2, 64M) for [[disk]] #0, as its size asks" in r.stderr
    blob_md5 = background.expect("READY").split()[1]
    pid = background.pid()

    # A second writer: refused before QEMU starts, with the holder's name.
    r = run_guest(qlaunch_bin, [f"disk.0.path={disk}"], "true")
    assert r.returncode == 5, r.stderr
    assert (
        f"qlaunch: error: disk #0 {disk} is in use by VM {name!r} (pid {pid}); "
        "QEMU's lock refuses it (hint: stop it first: a disk is written by one VM at a time)"
    ) in r.stderr
    # A throwaway overlay needs a base nobody writes: refused as well.
    r = run_guest(qlaunch_bin, [f"disk.0.path={disk}", "disk.0.snapshot=true"], "true")
    assert r.returncode == 5 and f"is in use by VM {name!r}" in r.stderr, r.stderr
    # QEMU's own lock is on too, for a second QEMU that skips qlaunch's check.
    prof = profile.load("default", [f"disk.0.path={disk}"])
    files = resolve.boot_files(prof, None, tmp_path)
    rt = argvmod.Runtime(name="second", kernel=files.kernel, initrd=files.initrd, paused=True)
    argv = argvmod.build_argv(prof, host.probe(), rt)
    # Paused (-S): were the lock off, this QEMU would wait, and the timeout would say so.
    second = subprocess.run(
        argv, capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL
    )
    assert second.returncode != 0
    assert 'Failed to get "write" lock' in second.stderr
    # Reading the header of a disk in use still works; checking it does not.
    r = subprocess.run([*qlaunch_bin, "image", "info", str(disk)], capture_output=True, text=True)
    assert r.returncode == 0 and "format: qcow2" in r.stdout, r.stderr
    r = subprocess.run([*qlaunch_bin, "image", "check", str(disk)], capture_output=True, text=True)
    assert r.returncode == 5 and f"is in use by VM {name!r}" in r.stderr, r.stderr

    # Crash: SIGKILL to QEMU after the guest's sync. The image is consistent and holds the data.
    holder = psutil.Process(pid)
    os.kill(pid, signal.SIGKILL)
    holder.wait(timeout=30)
    r = subprocess.run([*qlaunch_bin, "image", "check", str(disk)], capture_output=True, text=True)
    assert (r.returncode, r.stdout) == (0, f"{disk}: clean (qcow2)\n"), r.stderr

    # Boot 2, with a throwaway disk and a cloud-init seed beside the persistent one.
    base = tmp_path / "base.raw"
    base.write_bytes(os.urandom(MiB))
    base_sha = hashlib.sha256(base.read_bytes()).hexdigest()
    user_data = b'#cloud-config\n{"runcmd": ["echo from-seed"]}\n'
    (tmp_path / "user-data").write_bytes(user_data)
    qemu_tmp = tmp_path / "tmpdir"  # QEMU's overlay and qlaunch's run directory go here
    qemu_tmp.mkdir()
    read = (
        "mount -t ext2 /dev/vda /mnt && cat /mnt/hello.txt && "
        'echo "blob $(md5sum </mnt/blob | cut -d" " -f1)" && '
        "echo 'written by boot two' >/mnt/second.txt && umount /mnt && "
        "dd if=/dev/zero of=/dev/vdb bs=64k count=16 conv=fsync 2>/dev/null && "
        'echo "scratch $(head -c 1048576 /dev/vdb | md5sum | cut -d" " -f1)" && '
        "mkdir -p /seed && mount -t iso9660 -o ro /dev/sr0 /seed && "
        'echo "label $(dd if=/dev/sr0 bs=1 skip=32808 count=6 2>/dev/null)" && '
        "echo files $(ls /seed) && cat /seed/user-data && cat /seed/meta-data"
    )
    r = run_guest(
        qlaunch_bin,
        [
            f"disk.0.path={disk}",
            f"disk.1.path={base}",
            "disk.1.snapshot=true",
            "disk.1.cache=unsafe",
            "cloud-init.hostname=seeded",
            f"cloud-init.user_data={tmp_path / 'user-data'}",
            "cloud-init.ssh_authorized_keys=['ssh-ed25519 AAAAC3Nza k@h']",
        ],
        read,
        env={**os.environ, "TMPDIR": str(qemu_tmp)},
    )
    assert r.returncode == 0, r.stderr + r.stdout
    out = r.stdout.splitlines()
    assert "written by boot one" in out
    assert f"blob {blob_md5}" in out
    assert f"scratch {hashlib.md5(bytes(MiB)).hexdigest()}" in out
    assert "label cidata" in out
    assert "files meta-data user-data" in out
    assert user_data.decode().splitlines()[1] in out  # verbatim
    assert "local-hostname: seeded" in out
    assert 'public-keys: ["ssh-ed25519 AAAAC3Nza k@h"]' in out
    # The throwaway disk's base is untouched, and nothing is left: no overlay, no seed ISO.
    assert hashlib.sha256(base.read_bytes()).hexdigest() == base_sha
    assert list(qemu_tmp.iterdir()) == []

    # The graceful stop flushed boot two's write: read it from the host.
    r = subprocess.run([*qlaunch_bin, "image", "check", str(disk)], capture_output=True, text=True)
    assert (r.returncode, r.stdout) == (0, f"{disk}: clean (qcow2)\n"), r.stderr
    image.convert(disk, tmp_path / "flat.raw", "raw")
    debugfs = shutil.which("debugfs") or "/usr/sbin/debugfs"
    cat = subprocess.run(
        [debugfs, "-R", "cat /second.txt", str(tmp_path / "flat.raw")],
        capture_output=True,
        text=True,
        check=True,
    )
    assert cat.stdout == "written by boot two\n"
