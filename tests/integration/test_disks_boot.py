"""Disks as a guest sees them, on real QEMU under TCG with Debian's cloud kernel.

Three boots in all:
- one guest reads four disks converted raw -> qcow2 -> vdi -> vmdk and sees the same bytes;
- a guest makes a file system on a disk its profile creates (`size`), writes files, syncs and
  waits; meanwhile a second writer is refused, by qlaunch's check (naming the VM) and by QEMU's
  own lock; then QEMU is killed with SIGKILL, and `qemu-img check` finds the image clean;
- a guest boots again on that disk and reads the files back, writes one more and powers off;
  in the same boot it reads the cloud-init seed from its CD-ROM and writes to a throwaway disk
  whose base stays unchanged and which leaves no file behind.
"""

from __future__ import annotations

import hashlib
import os
import queue
import shutil
import subprocess
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from qlaunch import argv as argvmod
from qlaunch import disks, host, image, profile, resolve
from qlaunch.spawn import spawn, stop_child

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
class Guest:
    name: str
    proc: subprocess.Popen[bytes]
    lines: queue.Queue[str]

    def expect(self, prefix: str, timeout: float = 120) -> str:
        """The first console line starting with prefix (whatever came before is skipped)."""
        while True:
            try:
                line = self.lines.get(timeout=timeout)
            except queue.Empty:
                raise AssertionError(f"no {prefix!r} on the console of {self.name}") from None
            if line.startswith(prefix):
                return line


@pytest.fixture
def guest_on(tmp_path: Path) -> Iterator[object]:
    """Boot a `default` guest in the background through the Python API; killed at the end."""
    started: list[subprocess.Popen[bytes]] = []

    def boot(name: str, sets: list[str], script: str) -> Guest:
        prof = profile.load("default", sets)
        work = tmp_path / f"work-{name}"
        work.mkdir()
        files = resolve.boot_files(prof, ["sh", "-c", script], work)
        rt = argvmod.Runtime(
            name=name,
            kernel=files.kernel,
            initrd=files.initrd,
            dtb=files.dtb,
            disk_paths=disks.prepare_disks(prof, work),
        )
        argv = argvmod.build_argv(prof, host.probe(), rt)
        proc = spawn(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )
        started.append(proc)
        lines: queue.Queue[str] = queue.Queue()

        def pump() -> None:
            assert proc.stdout is not None
            for raw in proc.stdout:
                lines.put(raw.decode(errors="replace").strip())

        threading.Thread(target=pump, daemon=True).start()
        return Guest(name, proc, lines)

    yield boot
    for proc in started:
        stop_child(proc, grace=1.0)


def test_disk_lifecycle_lock_crash_safety_seed_and_throwaway(
    qlaunch_bin: list[str], tmp_path: Path, guest_on
) -> None:  # type: ignore[no-untyped-def]
    disk = tmp_path / "data.qcow2"
    name = f"holder-{uuid.uuid4().hex[:6]}"

    # Boot 1: the profile's size creates the disk; the guest writes and syncs, then waits.
    write = (
        "mke2fs /dev/vda >/dev/null && mount -t ext2 /dev/vda /mnt && "
        "echo 'written by boot one' >/mnt/hello.txt && "
        "dd if=/dev/urandom of=/mnt/blob bs=64k count=32 2>/dev/null && "
        'sync && echo "READY $(md5sum </mnt/blob | cut -d" " -f1)" && sleep 600'
    )
    g = guest_on(name, [f"disk.0.path={disk}", "disk.0.size=64M"], write)
    blob_md5 = g.expect("READY").split()[1]
    assert image.info(disk).format == "qcow2"

    # A second writer: refused before QEMU starts, with the holder's name.
    r = run_guest(qlaunch_bin, [f"disk.0.path={disk}"], "true")
    assert r.returncode == 5, r.stderr
    assert (
        f"qlaunch: error: disk #0 {disk} is in use by VM {name!r} (pid {g.proc.pid}); "
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
    g.proc.kill()
    g.proc.wait()
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
