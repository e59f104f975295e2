"""`qlaunch image ...`, `qlaunch seed` and the launch's disk step, with the real qemu-img and
qemu-io. No guest boots here (test_disks_boot.py has those)."""

from __future__ import annotations

import json
import os
import pty
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from qlaunch.config import profile
from qlaunch.errors import ProfileError, QemuError
from qlaunch.launch import disks
from qlaunch.storage import holders, image
from qlaunch.storage.holders import ImageInUse

MiB = 1 << 20


def cli(qlaunch_bin: list[str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*qlaunch_bin, *args], capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL
    )


def pattern_file(path: Path, size: int = 4 * MiB) -> bytes:
    data = os.urandom(size)
    path.write_bytes(data)
    return data


# --- qlaunch image -------------------------------------------------------------------------


def test_image_create_info_resize_check(qlaunch_bin: list[str], tmp_path: Path) -> None:
    d = tmp_path / "d.qcow2"
    r = cli(qlaunch_bin, "image", "create", str(d), "64M")
    assert r.returncode == 0, r.stderr
    assert r.stdout == f"created {d}: qcow2, 64M ({64 * MiB} bytes)\n"
    r = cli(qlaunch_bin, "image", "create", str(d), "64M")
    assert r.returncode == 2
    assert "already exists; refusing to overwrite it" in r.stderr

    r = cli(qlaunch_bin, "image", "info", str(d), "--json")
    info = json.loads(r.stdout)
    assert (info["format"], info["virtual_size"], info["backing_chain"]) == ("qcow2", 64 * MiB, [])
    r = cli(qlaunch_bin, "image", "info", str(d))
    assert f"image: {d}\n  format: qcow2\n  virtual size: 64M ({64 * MiB} bytes)\n" in r.stdout

    r = cli(qlaunch_bin, "image", "resize", str(d), "+64M")
    assert r.stdout == f"{d}: 64M ({64 * MiB} bytes) -> 128M ({128 * MiB} bytes)\n"
    r = cli(qlaunch_bin, "image", "resize", str(d), "32M")
    assert r.returncode == 2
    assert "shrinking destroys data at the end of the disk (hint: " in r.stderr
    assert "pass --shrink" in r.stderr
    r = cli(qlaunch_bin, "image", "resize", str(d), "32M", "--shrink")
    assert r.returncode == 0, r.stderr

    r = cli(qlaunch_bin, "image", "check", str(d))
    assert (r.returncode, r.stdout) == (0, f"{d}: clean (qcow2)\n")
    r = cli(qlaunch_bin, "image", "check", str(d), "--json")
    assert json.loads(r.stdout)["status"] == "clean"
    raw = tmp_path / "r.raw"
    cli(qlaunch_bin, "image", "create", str(raw), "1M", "--format", "raw")
    r = cli(qlaunch_bin, "image", "check", str(raw))
    assert r.returncode == 0
    assert r.stdout.startswith(f"{raw}: nothing to check (raw images have no metadata")


def test_image_check_exit_code_on_a_leak(qlaunch_bin: list[str], tmp_path: Path) -> None:
    d = tmp_path / "d.qcow2"
    image.create(d, 16 * MiB)
    # A refcount for a cluster past the end that nothing references: the usual after-crash leak.
    with d.open("r+b") as f:
        header = f.read(104)
        cluster = 1 << int.from_bytes(header[20:24], "big")
        f.seek(int.from_bytes(header[48:56], "big"))
        block = int.from_bytes(f.read(8), "big")
        leaked = -(-f.seek(0, os.SEEK_END) // cluster)
        f.truncate((leaked + 1) * cluster)
        f.seek(block + 2 * leaked)
        f.write((1).to_bytes(2, "big"))
    r = cli(qlaunch_bin, "image", "check", str(d))
    assert r.returncode == 1
    assert r.stdout.splitlines() == [
        f"{d}: leaks: 1 leaked cluster(s)",
        f"  leaks are harmless; to reclaim them: qemu-img check -r leaks {d}",
    ]


def test_image_overlay_and_backing(qlaunch_bin: list[str], tmp_path: Path) -> None:
    base = tmp_path / "base.raw"
    pattern_file(base, MiB)
    r = cli(qlaunch_bin, "image", "overlay", str(base), str(tmp_path / "ov.qcow2"))
    assert r.returncode == 0, r.stderr
    assert (
        r.stdout
        == f"created {tmp_path / 'ov.qcow2'}: qcow2 overlay on {base} (raw), 1M ({MiB} bytes)\n"
    )
    r = cli(
        qlaunch_bin,
        "image",
        "create",
        str(tmp_path / "top.qcow2"),
        "-b",
        str(tmp_path / "ov.qcow2"),
    )
    assert r.returncode == 0, r.stderr
    r = cli(qlaunch_bin, "image", "info", str(tmp_path / "top.qcow2"))
    assert f"  backing: {tmp_path / 'ov.qcow2'}\n" in r.stdout
    assert f"    backing: {base}\n      format: raw\n" in r.stdout
    r = cli(qlaunch_bin, "image", "create", str(tmp_path / "x.vdi"), "-f", "vdi", "-b", str(base))
    assert r.returncode == 2
    assert "a vdi image cannot have a backing file (hint: use --format qcow2)" in r.stderr
    r = cli(qlaunch_bin, "image", "create", str(tmp_path / "nosize.qcow2"))
    assert r.returncode == 2 and "image create needs a SIZE" in r.stderr


def test_image_sd_round_says_what_it_did(qlaunch_bin: list[str], tmp_path: Path) -> None:
    sd = tmp_path / "sd.raw"
    image.create(sd, 100 * MiB, fmt="raw")
    r = cli(qlaunch_bin, "image", "sd-round", str(sd))
    assert r.stdout == (
        f"{sd}: 100M ({100 * MiB} bytes) -> 128M ({128 * MiB} bytes) "
        "(grown to the next power of two, as an SD card image must be)\n"
    )
    assert sd.stat().st_size == 128 * MiB
    r = cli(qlaunch_bin, "image", "sd-round", str(sd))
    assert r.stdout == f"{sd}: 128M ({128 * MiB} bytes) is already a power of two; unchanged\n"


def test_image_convert_quiet_and_logged_progress(qlaunch_bin: list[str], tmp_path: Path) -> None:
    src = tmp_path / "src.raw"
    data = pattern_file(src)
    r = cli(
        qlaunch_bin, "image", "convert", str(src), str(tmp_path / "q.qcow2"), "-O", "qcow2", "-q"
    )
    assert (r.returncode, r.stdout, r.stderr) == (0, "", "")
    # stderr is a pipe here: a line per 10% step, never a bar.
    r = cli(
        qlaunch_bin,
        "image",
        "convert",
        str(tmp_path / "q.qcow2"),
        str(tmp_path / "b.raw"),
        "-O",
        "raw",
    )
    assert r.returncode == 0, r.stderr
    lines = r.stderr.splitlines()
    assert lines[-1] == "qlaunch: converting to raw: 100%"
    assert all(ln.startswith("qlaunch: converting to raw: ") for ln in lines)
    assert "\r" not in r.stderr and len(lines) <= 11
    assert (tmp_path / "b.raw").read_bytes() == data
    r = cli(qlaunch_bin, "image", "convert", str(src), str(tmp_path / "b.raw"), "-O", "raw")
    assert r.returncode == 2 and "already exists; refusing to overwrite it" in r.stderr


def test_image_convert_draws_a_bar_on_a_terminal(qlaunch_bin: list[str], tmp_path: Path) -> None:
    src = tmp_path / "src.raw"
    pattern_file(src)
    leader, follower = pty.openpty()
    try:
        proc = subprocess.Popen(
            [*qlaunch_bin, "image", "convert", str(src), str(tmp_path / "d.vmdk"), "-O", "vmdk"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=follower,
        )
        os.close(follower)
        follower = -1
        seen = b""
        while True:
            try:
                chunk = os.read(leader, 4096)
            except OSError:  # EIO: the last writer closed the terminal
                break
            if not chunk:
                break
            seen += chunk
        assert proc.wait(timeout=60) == 0
    finally:
        os.close(leader)
        if follower >= 0:
            os.close(follower)
    text = seen.decode()
    assert text.startswith("\rconverting to vmdk [")
    assert text.endswith("[" + "#" * 30 + "] 100.0%\r\n")  # the tty turns the final \n into \r\n
    assert image.info(tmp_path / "d.vmdk").format == "vmdk"


# --- qlaunch seed ----------------------------------------------------------------------------


def test_seed_command(qlaunch_bin: list[str], tmp_path: Path) -> None:
    ud = tmp_path / "user-data"
    ud.write_bytes(b"#!/bin/sh\necho hello\n")
    out = tmp_path / "seed.iso"
    r = cli(
        qlaunch_bin,
        "seed",
        str(out),
        "--user-data",
        str(ud),
        "--hostname",
        "vm1",
        "--ssh-key",
        "ssh-ed25519 AAAA k@h",
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout == f"wrote {out}: user-data, meta-data (label cidata)\n"
    assert out.read_bytes()[16 * 2048 + 40 : 16 * 2048 + 46] == b"cidata"
    r = cli(
        qlaunch_bin,
        "seed",
        str(out),
        "--user-data",
        str(ud),
        "--meta-data",
        str(ud),
        "--hostname",
        "x",
    )
    assert r.returncode == 2 and "cannot go with --meta-data" in r.stderr
    r = cli(qlaunch_bin, "seed", str(out), "--user-data", str(tmp_path / "nope"))
    assert r.returncode == 2 and f"--user-data {tmp_path / 'nope'}: No such file" in r.stderr
    r = cli(
        qlaunch_bin, "seed", str(tmp_path / "s2.iso"), "--user-data", str(ud), "--hostname", "a_b"
    )
    assert r.returncode == 2 and "bad hostname 'a_b'" in r.stderr
    assert not (tmp_path / "s2.iso").exists()


# --- the launch's disk step ------------------------------------------------------------------


def prof(tmp_path: Path, body: str) -> profile.Profile:
    (tmp_path / "p.toml").write_text('extends = "default"\n' + body)
    return profile.load(str(tmp_path / "p.toml"))


def test_prepare_creates_missing_images_and_the_seed(tmp_path: Path) -> None:
    work = tmp_path / "work"
    work.mkdir()
    (tmp_path / "ud").write_bytes(b"#cloud-config\n{}\n")
    p = prof(
        tmp_path,
        f'[[disk]]\npath = "{tmp_path}/new.vdi"\nsize = "32M"\n'
        f'[[disk]]\npath = "{tmp_path}/new.raw"\nsize = "1M"\n'
        f'[cloud-init]\nuser_data = "{tmp_path}/ud"\nhostname = "h1"\n',
    )
    notes: list[str] = []
    paths = disks.prepare_disks(p, work, note=notes.append)
    assert paths == (
        str(tmp_path / "new.vdi"),
        str(tmp_path / "new.raw"),
        str(work / disks.SEED_NAME),
    )
    assert (image.info(paths[0]).format, image.info(paths[0]).virtual_size) == ("vdi", 32 * MiB)
    assert os.path.getsize(paths[1]) == MiB
    assert notes == [
        f"created {tmp_path}/new.vdi (vdi, 32M) for [[disk]] #0, as its size asks",
        f"created {tmp_path}/new.raw (raw, 1M) for [[disk]] #1, as its size asks",
    ]
    # Existing images are used as they are: a second start creates nothing and resizes nothing.
    notes.clear()
    assert disks.prepare_disks(p, work, note=notes.append) == paths
    assert notes == []


def test_prepare_refuses_before_making_anything(tmp_path: Path) -> None:
    p = prof(
        tmp_path,
        f'[[disk]]\npath = "{tmp_path}/a.qcow2"\nsize = "8M"\n'
        f'[[disk]]\npath = "{tmp_path}/missing.qcow2"\n',
    )
    with pytest.raises(ProfileError) as exc:
        disks.prepare_disks(p, tmp_path)
    assert (
        exc.value.message
        == f"{p.source}: [[disk]] #1 path: {tmp_path}/missing.qcow2 does not exist"
    )
    assert exc.value.hint is not None and 'size = "8G"' in exc.value.hint
    assert sorted(x.name for x in tmp_path.iterdir()) == ["p.toml"]
    p = prof(
        tmp_path,
        f'[[disk]]\npath = "{tmp_path}/a.qcow2"\nsize = "8M"\n[cloud-init]\nuser_data = "nope"\n',
    )
    with pytest.raises(ProfileError, match=r"\[cloud-init\] user_data: nope does not exist"):
        disks.prepare_disks(p, tmp_path)
    assert sorted(x.name for x in tmp_path.iterdir()) == ["p.toml"]


def test_prepare_checks_sd_sizes_and_formats(tmp_path: Path) -> None:
    sd = tmp_path / "sd.qcow2"
    image.create(sd, 100 * MiB)
    (tmp_path / "p.toml").write_text(
        '[machine]\narch = "arm"\nmachine = "vexpress-a9"\n[boot]\nkernel = "k"\n'
        f'[[disk]]\npath = "{sd}"\n'
    )
    p = profile.load(str(tmp_path / "p.toml"))
    with pytest.raises(ProfileError) as exc:
        disks.prepare_disks(p, tmp_path)
    assert "is 100M, but an SD card image must be a power of two in size" in exc.value.message
    assert exc.value.hint == f"grow it to 128M with: qlaunch image sd-round {sd}"
    raw = tmp_path / "d.qcow2"
    raw.write_bytes(bytes(MiB))  # named .qcow2, but raw inside
    with pytest.raises(QemuError) as qexc:
        disks.prepare_disks(prof(tmp_path, f'[[disk]]\npath = "{raw}"\n'), tmp_path)
    assert qexc.value.message.startswith(f"disk #0 {raw} cannot be opened as qcow2: ")
    assert "qcow2" in qexc.value.message.split(": ", 1)[1]


@pytest.fixture
def held(tmp_path: Path) -> Iterator[tuple[Path, subprocess.Popen[bytes]]]:
    """A qcow2 image held open read-write by qemu-io, which locks it as a VM does."""
    p = tmp_path / "held.qcow2"
    image.create(p, 16 * MiB)
    proc = subprocess.Popen(
        ["qemu-io", "-f", "qcow2", str(p)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.read(len("qemu-io> ")) == b"qemu-io> "
        yield p, proc
    finally:
        proc.kill()
        proc.wait()


@pytest.mark.parametrize("extra", ["", "snapshot = true", "readonly = true"])
def test_prepare_names_who_holds_a_disk(
    held: tuple[Path, subprocess.Popen[bytes]], tmp_path: Path, extra: str
) -> None:
    path, proc = held
    with pytest.raises(ImageInUse) as exc:
        disks.prepare_disks(prof(tmp_path, f'[[disk]]\npath = "{path}"\n{extra}\n'), tmp_path)
    assert exc.value.message == (
        f"disk #0 {path} is in use by another process (pid {proc.pid}, qemu-io); "
        "QEMU's lock refuses it"
    )
    assert exc.value.exit_code == 5


def test_overlay_users_share_their_base(
    held: tuple[Path, subprocess.Popen[bytes]], tmp_path: Path
) -> None:
    # Writers of two overlays on one base do not conflict; a writer of the base itself would.
    path, proc = held
    proc.kill()
    proc.wait()
    ov1, ov2 = tmp_path / "ov1.qcow2", tmp_path / "ov2.qcow2"
    image.overlay(path, ov1)
    image.overlay(path, ov2)
    holder = subprocess.Popen(
        ["qemu-io", "-f", "qcow2", str(ov1)], stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )
    try:
        assert holder.stdout is not None and holder.stdout.read(9) == b"qemu-io> "
        disks.check_lock(str(ov2), "qcow2", write=True)
        with pytest.raises(ImageInUse) as exc:
            disks.check_lock(str(path), "qcow2", write=True, label="disk #3")
        assert exc.value.message.startswith(
            f"disk #3 {path} is in use by another process (pid {holder.pid}"
        )
    finally:
        holder.kill()
        holder.wait()


def test_vm_name_from_a_qemu_command_line() -> None:
    q = "/usr/bin/qemu-system-x86_64"
    assert holders.vm_name([q, "-name", "guest=web-1,debug-threads=on"]) == "web-1"
    assert holders.vm_name([q, "-name", "plain"]) == "plain"
    assert holders.vm_name([q, "-name", "guest=a,,b,debug-threads=on"]) == "a,b"
    assert holders.vm_name([q, "-m", "1G"]) is None
    assert holders.vm_name(["qemu-io", "-name", "x"]) is None
