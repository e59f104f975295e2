"""Boards: their limits as one-line errors, SD card and kernel checks at launch, `qlaunch boards`.

Launch checks run `qlaunch run` on profiles whose kernel is a few bytes of a real image header:
each case fails before QEMU would start, so no QEMU runs here.
"""

from __future__ import annotations

import json
import struct
import subprocess
from pathlib import Path

import pytest

from qlaunch.config import boards, profile
from qlaunch.errors import ProfileError
from qlaunch.storage import sdcard

SHIPPED = {
    "aarch64-virt": ("aarch64", "virt"),
    "arm-virt": ("arm", "virt"),
    "vexpress-a9": ("arm", "vexpress-a9"),
    "vexpress-a15": ("arm", "vexpress-a15"),
    "raspi3b": ("aarch64", "raspi3b"),
    "raspi2b": ("arm", "raspi2b"),
    "x86_64-q35": ("x86_64", "q35"),
    "x86_64-microvm": ("x86_64", "microvm"),
}


def write(tmp_path: Path, body: str, name: str = "p.toml") -> str:
    p = tmp_path / name
    p.write_text(body)
    return str(p)


def one_line_error(run_cli, *args: str) -> tuple[int, str]:  # type: ignore[no-untyped-def]
    code, out, err = run_cli(*args)
    lines = err.strip().splitlines()
    assert out == ""
    assert "Traceback" not in err
    # A TCG note may come first on `run`; the error itself is one line.
    errors = [line for line in lines if line.startswith("qlaunch: error: ")]
    assert len(errors) == 1 and errors[0] == lines[-1], err
    return code, errors[0]


# ---- the records ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_shipped_profiles_are_their_boards(name: str) -> None:
    p = profile.load(name)
    arch, machine = SHIPPED[name]
    assert (p.machine.arch, p.machine.machine) == (arch, machine)
    b = p.board
    assert p.console_tty == b.console
    if b.dtb:
        assert p.boot.dtb == f"asset:{arch}/dtbs/{b.dtb}"
    if b.smp_fixed:
        assert p.machine.smp == b.smp_fixed
    if b.memory_fixed_mib:
        assert p.machine.memory_mib == b.memory_fixed_mib


@pytest.mark.parametrize("key", sorted(boards.BOARDS), ids=lambda k: f"{k[0]}-{k[1]}")
def test_board_records_are_consistent(key: tuple[str, str]) -> None:
    b = boards.BOARDS[key]
    assert b.binary == boards.QEMU_BINARY[b.arch]
    low = b.memory_fixed_mib or b.memory_max_mib
    assert low is None or b.memory_default_mib <= low
    assert b.smp_fixed is None or b.smp_max is None or b.smp_fixed <= b.smp_max
    assert ("sd" in b.storage) == (b.sd_slots > 0)
    assert b.sd_pow2 == ("sd" in b.storage)
    assert 0 <= b.console_serial <= b.extra_serials
    if b.halts_on_poweroff:
        assert not b.acpi


# ---- limits at validation: one line each ---------------------------------------------------

K_ARM = '[boot]\nkernel = "asset:arm/kernel"\ninitrd = "qlaunch"\n'
K_ARM64 = '[boot]\nkernel = "asset:aarch64/kernel"\ninitrd = "qlaunch"\n'


def board(arch: str, machine: str, extra: str = "") -> str:
    k = K_ARM64 if arch == "aarch64" else K_ARM
    return f"{k}[machine]\narch = '{arch}'\nmachine = '{machine}'\n{extra}"


def limit(what: str, arch: str, machine: str, extra: str, expect: str) -> tuple[str, str, str]:
    """A case whose message is "[machine] KEY: MACHINE EXPECT" or names the key itself."""
    if not expect.startswith("["):
        expect = f"[machine] {'smp' if 'CPU' in expect else 'memory'}: {machine} {expect}"
    return what, board(arch, machine, extra), expect


SD = "[[disk]]\npath = 'a.img'\n"

LIMITS = [
    limit("raspi3b 2G", "aarch64", "raspi3b", "memory = '2G'", "takes exactly 1G of RAM, not 2G"),
    limit(
        "raspi3b 512M", "aarch64", "raspi3b", "memory = 512", "takes exactly 1G of RAM, not 512M"
    ),
    limit("raspi3b 2 CPUs", "aarch64", "raspi3b", "smp = 2", "has exactly 4 CPUs, not 2"),
    limit("raspi2b 2G", "arm", "raspi2b", "memory = '2G'", "takes exactly 1G of RAM, not 2G"),
    limit("raspi2b 1 CPU", "arm", "raspi2b", "smp = 1", "has exactly 4 CPUs, not 1"),
    limit(
        "vexpress-a9 2G", "arm", "vexpress-a9", "memory = '2G'", "takes at most 1G of RAM, not 2G"
    ),
    limit(
        "vexpress-a9 1025M",
        "arm",
        "vexpress-a9",
        "memory = 1025",
        "takes at most 1G of RAM, not 1025M",
    ),
    limit("vexpress-a9 5 CPUs", "arm", "vexpress-a9", "smp = 5", "takes at most 4 CPUs, not 5"),
    limit(
        "vexpress-a15 31G",
        "arm",
        "vexpress-a15",
        "memory = '31G'",
        "takes at most 30G of RAM, not 31G",
    ),
    limit("vexpress-a15 5 CPUs", "arm", "vexpress-a15", "smp = 5", "takes at most 4 CPUs, not 5"),
    limit("arm virt 4G", "arm", "virt", "memory = '4G'", "takes at most 3G of RAM, not 4G"),
    limit("aarch64 virt 9 CPUs", "aarch64", "virt", "smp = 9", "takes at most 8 CPUs, not 9"),
    limit(
        "SD size not a power of two",
        "arm",
        "vexpress-a9",
        SD + "size = '3M'",
        "[[disk]] #0 size: SD card images must be a power of two in size, not 3M",
    ),
    limit(
        "two SD cards",
        "arm",
        "vexpress-a9",
        SD + SD,
        "[[disk]] #1 interface: vexpress-a9 has 1 SD card slot, filled by an earlier [[disk]]",
    ),
    limit(
        "virtio disk on an SD board",
        "aarch64",
        "raspi3b",
        SD + "interface = 'virtio'",
        "[[disk]] #0 interface: raspi3b has no virtio storage",
    ),
    limit(
        "NIC on raspi",
        "aarch64",
        "raspi3b",
        "[[net]]\nmode = 'user'",
        "[[net]] #0: raspi3b has no network card",
    ),
    limit(
        "raspi board for the wrong arch",
        "arm",
        "raspi3b",
        "",
        "[machine] machine: 'raspi3b' is not a machine for arch arm",
    ),
]


@pytest.mark.parametrize(("what", "body", "expect"), LIMITS, ids=[c[0] for c in LIMITS])
def test_board_limit_is_one_line(
    run_cli, tmp_path: Path, what: str, body: str, expect: str
) -> None:
    path = write(tmp_path, body)
    code, line = one_line_error(run_cli, "cmdline", path)
    assert code == 2
    assert line.startswith(f"qlaunch: error: {path}: ")
    assert expect in line


def test_limit_errors_from_set_name_the_profile(run_cli) -> None:
    code, line = one_line_error(run_cli, "cmdline", "raspi3b", "--set", "machine.smp=2")
    assert code == 2
    assert "raspi3b.toml: [machine] smp: raspi3b has exactly 4 CPUs, not 2" in line


def test_limits_at_the_edge_are_accepted(tmp_path: Path) -> None:
    ok = [
        board("arm", "vexpress-a9", "memory = '1G'\nsmp = 4"),
        board("arm", "vexpress-a15", "memory = '30G'"),
        board("aarch64", "raspi3b", "memory = '1G'\nsmp = 4"),
        board("arm", "virt", "memory = '3G'\nsmp = 8"),
    ]
    for n, body in enumerate(ok):
        profile.load(write(tmp_path, body, f"ok{n}.toml"))


# ---- launch checks: kernel header and SD card size -----------------------------------------


def fake_kernel(tmp_path: Path, arch: str) -> str:
    """The first bytes of a real kernel image of arch, as detect_arch reads them."""
    head = bytearray(0x240)
    if arch == "arm":
        struct.pack_into("<I", head, 0x24, 0x016F2818)
    elif arch == "aarch64":
        head[0x38:0x3C] = b"ARM\x64"
    elif arch in ("x86_64", "i386"):
        head[0x202:0x206] = b"HdrS"
        struct.pack_into("<H", head, 0x206, 0x20F)
        struct.pack_into("<H", head, 0x236, 1 if arch == "x86_64" else 0)
    p = tmp_path / f"vmlinuz-{arch}"
    p.write_bytes(bytes(head))
    return str(p)


def own_kernel(arch: str, machine: str, kernel: str, extra: str = "") -> str:
    # No initrd and no DTB: the launch checks run, and nothing else is needed before them.
    return (
        f"[machine]\narch = '{arch}'\nmachine = '{machine}'\n[boot]\nkernel = '{kernel}'\n{extra}"
    )


@pytest.mark.parametrize(
    ("arch", "machine", "kernel_arch", "expect"),
    [
        ("arm", "raspi2b", "aarch64", "is an arm64 Image (aarch64), but raspi2b is an arm board"),
        ("aarch64", "raspi3b", "arm", "is an arm zImage (arm), but raspi3b is an aarch64 board"),
        ("arm", "vexpress-a15", "x86_64", "is an x86_64 bzImage (x86_64), but vexpress-a15 is an"),
        ("x86_64", "q35", "aarch64", "is an arm64 Image (aarch64), but q35 is an x86_64 board"),
    ],
)
def test_kernel_for_another_arch_names_both(
    run_cli, tmp_path: Path, arch: str, machine: str, kernel_arch: str, expect: str
) -> None:
    kernel = fake_kernel(tmp_path, kernel_arch)
    path = write(tmp_path, own_kernel(arch, machine, kernel))
    code, line = one_line_error(run_cli, "run", path)
    assert code == 2
    assert f"{path}: [boot] kernel: {kernel} {expect}" in line
    assert "(hint: give " in line


def test_kernels_the_board_boots_pass(tmp_path: Path) -> None:
    from qlaunch.boot import kernelcheck

    for arch, machine, kernel_arch in [
        ("arm", "raspi2b", "arm"),
        ("aarch64", "raspi3b", "aarch64"),
        ("x86_64", "q35", "i386"),  # qemu-system-x86_64 boots 32-bit kernels
    ]:
        kernel = fake_kernel(tmp_path, kernel_arch)
        p = profile.load(write(tmp_path, own_kernel(arch, machine, kernel)))
        kernelcheck.check_kernel(p, kernel)
    # A header qlaunch does not know is QEMU's to judge.
    unknown = tmp_path / "u-boot.bin"
    unknown.write_bytes(b"\0" * 4096)
    p = profile.load(write(tmp_path, own_kernel("arm", "vexpress-a9", str(unknown))))
    kernelcheck.check_kernel(p, str(unknown))


def test_sd_image_not_a_power_of_two_is_refused_with_the_round_up_command(
    run_cli, tmp_path: Path
) -> None:
    img = tmp_path / "card.img"
    img.write_bytes(b"\0" * (3 << 20))
    kernel = fake_kernel(tmp_path, "arm")
    path = write(tmp_path, own_kernel("arm", "vexpress-a9", kernel, f"[[disk]]\npath = '{img}'\n"))
    code, line = one_line_error(run_cli, "run", path)
    assert code == 2
    assert (
        f"{path}: [[disk]] #0 path: {img} is 3M, but an SD card image must be a power of two"
        in line
    )
    assert f"(hint: grow it to 4M with: {sdcard.ROUND_UP_COMMAND} {img})" in line
    assert img.stat().st_size == 3 << 20  # never rounded behind the user's back


def test_round_up_command_exists() -> None:
    from qlaunch.cli.app import build_parser

    words = sdcard.ROUND_UP_COMMAND.split()
    assert words[:2] == ["qlaunch", "image"]
    parser = build_parser()
    # argparse exits 0 on --help of a sub-action that exists, 2 on one that does not.
    with pytest.raises(SystemExit) as e:
        parser.parse_args([*words[1:], "--help"])
    assert e.value.code == 0


def test_empty_sd_image_is_refused(tmp_path: Path) -> None:
    img = tmp_path / "empty.img"
    img.write_bytes(b"")
    p = profile.load(write(tmp_path, board("arm", "vexpress-a9") + f"[[disk]]\npath = '{img}'\n"))
    with pytest.raises(ProfileError, match="is empty, and an SD card image must be a power"):
        sdcard.check_images(p)


def test_sd_sizes_that_pass(tmp_path: Path) -> None:
    raw = tmp_path / "ok.img"
    raw.write_bytes(b"\0" * (1 << 20))
    body = board("aarch64", "raspi3b") + f"[[disk]]\npath = '{raw}'\n"
    sdcard.check_images(profile.load(write(tmp_path, body)))
    # Not there yet: the disk's own size (validated) makes it at start.
    body = (
        board("aarch64", "raspi3b") + f"[[disk]]\npath = '{tmp_path / 'new.img'}'\nsize = '64M'\n"
    )
    sdcard.check_images(profile.load(write(tmp_path, body, "new.toml")))


def test_qcow2_sd_image_is_judged_by_its_virtual_size(tmp_path: Path) -> None:
    img = tmp_path / "card.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(img), "3M"], check=True)
    body = board("arm", "raspi2b") + f"[[disk]]\npath = '{img}'\n"
    with pytest.raises(ProfileError, match=r"card.qcow2 is 3M, but an SD card image") as e:
        sdcard.check_images(profile.load(write(tmp_path, body)))
    assert e.value.hint is not None and "grow it to 4M" in e.value.hint


# ---- qlaunch boards ------------------------------------------------------------------------


def test_boards_json_lists_every_board_with_limits_and_binary(run_cli) -> None:
    code, out, err = run_cli("boards", "--json")
    assert code == 0, err
    rows = json.loads(out)
    by = {(r["arch"], r["machine"]): r for r in rows}
    assert set(by) == set(boards.BOARDS)
    pi = by[("aarch64", "raspi3b")]
    assert pi["smp"] == {"fixed": 4, "max": 4}
    assert pi["memory_mib"]["fixed"] == 1024
    assert pi["qemu_binary"] == "qemu-system-aarch64"
    assert isinstance(pi["installed"], bool)
    assert pi["installed"] == (pi["qemu_path"] is not None)
    assert pi["storage"] == ["sd"] and pi["nic_model"] is None
    assert pi["halts_on_poweroff"] is True
    assert pi["profiles"] == ["raspi3b"]
    vex = by[("arm", "vexpress-a9")]
    assert vex["memory_mib"]["max"] == 1024 and vex["smp"]["max"] == 4
    assert vex["dtb"] == "vexpress-v2p-ca9.dtb"
    for name, key in SHIPPED.items():
        assert name in by[key]["profiles"]


def test_boards_table(run_cli) -> None:
    code, out, _ = run_cli("boards")
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split()[:4] == ["ARCH", "MACHINE", "CPUS", "RAM"]
    raspi = next(line.split() for line in lines if " raspi2b " in line)
    assert raspi[:4] == ["arm", "raspi2b", "=4", "=1G"]
    assert "qemu-system-arm" in raspi


def test_boards_without_virtio_load_no_virtio_modules() -> None:
    from qlaunch.boot import initramfs

    for arch, defaults in initramfs.DEFAULT_MODULES.items():
        for b in (b for (a, _), b in boards.BOARDS.items() if a == arch):
            mods = boards.guest_modules(b, defaults)
            if b.virtio:
                # of the transports' drivers, the board's own alone
                others = {mod for t, (_, mod) in boards.VIRTIO_BUS.items() if t != b.virtio}
                assert mods == [m for m in defaults if m not in others]
            else:
                assert not set(mods) & boards.VIRTIO_MODULES
                assert "ext4" in mods and "vfat" in mods  # what an SD card holds
    # The names are the initramfs's own: a renamed module must not slip through.
    every = {m for mods in initramfs.DEFAULT_MODULES.values() for m in mods}
    assert boards.VIRTIO_MODULES.issubset(every)


# ---- DTB cuts --------------------------------------------------------------------------------


def fdt(tree: dict[str, object]) -> bytes:
    """A flattened device tree (version 17) of nested dicts: str values are properties."""
    strings = bytearray()
    offsets: dict[str, int] = {}

    def name_off(name: str) -> int:
        if name not in offsets:
            offsets[name] = len(strings)
            strings.extend(name.encode() + b"\0")
        return offsets[name]

    def pad(b: bytes) -> bytes:
        return b + b"\0" * (-len(b) % 4)

    def node(name: str, body: dict[str, object]) -> bytes:
        out = struct.pack(">I", 1) + pad(name.encode() + b"\0")
        for k, v in body.items():
            if isinstance(v, str):
                data = v.encode() + b"\0"
                out += struct.pack(">III", 3, len(data), name_off(k)) + pad(data)
        for k, v in body.items():
            if isinstance(v, dict):
                out += node(k, v)
        return out + struct.pack(">I", 2)

    structure = node("", tree) + struct.pack(">I", 9)
    off_rsv = 40
    off_struct = off_rsv + 16
    off_strings = off_struct + len(structure)
    total = off_strings + len(strings)
    header = struct.pack(
        ">10I", 0xD00DFEED, total, off_struct, off_strings, off_rsv, 17, 16, 0,
        len(strings), len(structure),
    )  # fmt: skip
    return header + b"\0" * 16 + structure + bytes(strings)


def structure_block(blob: bytes) -> bytes:
    total, off_struct = struct.unpack_from(">II", blob, 4)
    off_strings = struct.unpack_from(">I", blob, 12)[0]
    size_struct = struct.unpack_from(">I", blob, 36)[0]
    assert total == len(blob) and off_strings == off_struct + size_struct
    return blob[off_struct:off_strings]


def test_dtb_node_is_cut_and_the_rest_kept() -> None:
    from qlaunch.boot import dtb

    tree = {
        "model": "Pi",
        "soc": {
            "serial@7e201000": {"status": "okay", "bluetooth": {"compatible": "brcm,bt"}},
            "mmc@7e300000": {"status": "okay"},
        },
    }
    want = {
        "model": "Pi",
        "soc": {"serial@7e201000": {"status": "okay"}, "mmc@7e300000": {"status": "okay"}},
    }
    blob = fdt(tree)
    cut = dtb.remove_nodes(blob, ("/soc/serial@7e201000/bluetooth",))
    # The structure is the one a tree without the node has (its strings block keeps an unused
    # "compatible", which harms no one).
    assert structure_block(cut) == structure_block(fdt(want))
    assert b"bluetooth" not in cut and b"brcm,bt" not in cut
    assert b"mmc@7e300000" in cut
    assert dtb.remove_nodes(cut, ("/soc/serial@7e201000/bluetooth",)) == cut
    assert dtb.remove_nodes(blob, ("/soc/nothing-here",)) == blob
    assert dtb.remove_nodes(b"not a dtb", ("/soc",)) == b"not a dtb"


def test_raspi3b_dtb_copy_has_no_bluetooth(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from qlaunch.boot import dtb

    monkeypatch.setenv("QLAUNCH_CACHE", str(tmp_path / "cache"))
    src = tmp_path / "bcm2837-rpi-3-b.dtb"
    src.write_bytes(fdt({"soc": {"serial@7e201000": {"bluetooth": {"compatible": "brcm,bt"}}}}))
    pi = boards.BOARDS[("aarch64", "raspi3b")]
    got = dtb.for_board(pi, str(src))
    assert got is not None and got != str(src)
    assert b"bluetooth" not in Path(got).read_bytes()
    assert src.read_bytes().count(b"bluetooth") == 1  # the asset itself is left alone
    assert dtb.for_board(pi, str(src)) == got  # made once, then reused
    vex = boards.BOARDS[("arm", "vexpress-a9")]
    assert dtb.for_board(vex, str(src)) == str(src)
