"""The four guest architectures beyond x86_64 and ARM: i386, ppc64le, s390x, mips64el.

Their boards and limits, the kernel images each boots (and the refusal of another arch's before
QEMU starts), their shipped profiles, `qlaunch boards --json`, what each board cannot do, and
the console shapes of their oopses. No QEMU runs here.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

from qlaunch.boot import assets, kernelcheck
from qlaunch.boot import kernel as kmod
from qlaunch.config import boards, profile
from qlaunch.errors import ProfileError
from qlaunch.testloop import console as con

NEW = {
    # arch: (profile, machine, console, virtio transport, what `uname -m` says)
    "i386": ("i386-pc", "pc", "ttyS0", "pci", "i686"),
    "ppc64le": ("ppc64le-pseries", "pseries", "hvc0", "pci", "ppc64le"),
    "s390x": ("s390x-ccw", "s390-ccw-virtio", "ttysclp0", "ccw", "s390x"),
    "mips64el": ("mips64el-malta", "malta", "ttyS0", "pci", "mips64"),
}


def elf_header(machine: int, *, wide: bool, little: bool) -> bytes:
    end = "<" if little else ">"
    ident = b"\x7fELF" + bytes([2 if wide else 1, 1 if little else 2, 1]) + b"\0" * 9
    return ident + struct.pack(end + "HH", 2, machine) + b"\0" * 64


def s390_image() -> bytes:
    head = bytearray(0x10100)
    head[0x10008:0x1000E] = b"S390EP"
    return bytes(head)


@pytest.mark.parametrize(
    ("head", "arch"),
    [
        (elf_header(21, wide=True, little=True), "ppc64le"),
        (elf_header(21, wide=True, little=False), "ppc64"),
        (elf_header(8, wide=True, little=True), "mips64el"),
        (elf_header(8, wide=True, little=False), "mips64"),
        (elf_header(8, wide=False, little=True), "mipsel"),
        (elf_header(8, wide=False, little=False), "mips"),
        (elf_header(22, wide=True, little=False), "s390x"),
        (elf_header(3, wide=False, little=True), "i386"),
        (elf_header(62, wide=True, little=True), "x86_64"),
        (elf_header(183, wide=True, little=True), "aarch64"),
        (s390_image(), "s390x"),
        (elf_header(0x9026, wide=True, little=True), None),  # alpha: not one qlaunch names
    ],
    ids=lambda v: v if isinstance(v, str) or v is None else "",
)
def test_image_headers(tmp_path: Path, head: bytes, arch: str | None) -> None:
    f = tmp_path / "kernel"
    f.write_bytes(head)
    assert kmod.detect_arch(f) == arch


@pytest.mark.parametrize("arch", sorted(NEW))
def test_debian_kernels_are_recognised(arch: str) -> None:
    """The images Debian's packages hold: a bzImage (686), an ELF vmlinux (powerpc64le), an
    s390 image, and a self-decompressing ELF vmlinuz (5kc-malta)."""
    try:
        aset = assets.require(arch)
    except Exception:
        pytest.skip(f"asset set {arch} is not fetched (qlaunch assets fetch --arch {arch})")
    assert kmod.detect_arch(aset.kernel) == arch


@pytest.mark.parametrize("arch", sorted(NEW))
def test_shipped_profiles(arch: str) -> None:
    name, machine, tty, transport, _ = NEW[arch]
    p = profile.load(name)
    assert (p.machine.arch, p.machine.machine) == (arch, machine)
    assert p.board is boards.BOARDS[arch, machine]
    assert p.console_tty == tty
    assert p.board.virtio == transport
    assert p.boot.kernel == f"asset:{arch}/kernel" and p.boot.initrd == "qlaunch"
    assert boards.DEFAULT_MACHINE[arch] == machine
    assert kernelcheck.PROFILE_FOR[arch] == name
    assert arch in assets.ASSET_SETS and assets.arch_of(arch) == arch


def build(body: str) -> profile.Profile:
    import tomllib

    return profile.build(tomllib.loads(body), name="t", source="t.toml")


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (
            'arch = "ppc64le"\nmemory = "300M"',
            "t.toml: [machine] memory: pseries takes RAM in steps of 256M, not 300M",
        ),
        ('arch = "mips64el"\nmemory = "3G"', "malta takes at most 2G of RAM, not 3G"),
        ('arch = "mips64el"\nsmp = 2', "malta takes at most 1 CPUs, not 2"),
        ('arch = "s390x"\nsmp = 249', "s390-ccw-virtio takes at most 248 CPUs, not 249"),
        ('arch = "i386"\nmemory = "4G"', "pc takes at most 3G of RAM, not 4G"),
        ('arch = "i386"\nmachine = "pseries"', "is not a machine for arch i386"),
    ],
)
def test_limits_are_one_line(body: str, message: str) -> None:
    with pytest.raises(ProfileError) as e:
        build("[machine]\n" + body + "\n")
    assert message in e.value.message and "\n" not in e.value.message


def test_pseries_alignment_hint_rounds_up() -> None:
    with pytest.raises(ProfileError) as e:
        build('[machine]\narch = "ppc64le"\nmemory = "300M"\n')
    assert e.value.hint == 'set [machine] memory = "512M"'


def test_s390x_devices_are_ccw() -> None:
    from qlaunch.launch import argv as argvmod

    assert argvmod._virtio("ccw", "virtio-blk") == "virtio-blk-ccw"
    assert boards.BOARDS["s390x", "s390-ccw-virtio"].nic_model == "virtio-net-ccw"
    assert boards.VIRTIO_BUS["ccw"] == ("S390_GUEST", "virtio_ccw")


def test_wrong_arch_kernel_is_refused_naming_both(tmp_path: Path, run_cli) -> None:  # type: ignore[no-untyped-def]
    """A ppc64le vmlinux on the s390x board: refused before QEMU starts, one line, exit 2."""
    k = tmp_path / "vmlinux"
    k.write_bytes(elf_header(21, wide=True, little=True))
    code, out, err = run_cli("run", "s390x-ccw", "--set", f"boot.kernel={k}", "--", "true")
    errors = [ln for ln in err.splitlines() if ln.startswith("qlaunch: error: ")]
    assert code == 2 and out == "" and len(errors) == 1, err
    assert f"{k} is a little-endian ppc64 ELF vmlinux (ppc64le)" in errors[0]
    assert "s390-ccw-virtio is an s390x board" in errors[0]
    assert "ppc64le-pseries" in errors[0]


@pytest.mark.parametrize(
    ("machine_arch", "kernel_arch", "ok"),
    [
        ("i386", "i386", True),
        ("i386", "x86_64", False),  # qemu-system-i386 runs no 64-bit kernel
        ("x86_64", "i386", True),
        ("mips64el", "mips64", False),  # the other byte order
        ("ppc64le", "ppc64", False),
        ("s390x", "s390x", True),
    ],
)
def test_kernel_arch_pairs(machine_arch: str, kernel_arch: str, ok: bool) -> None:
    accepted = kernelcheck.ACCEPTS.get(machine_arch, (machine_arch,))
    assert (kernel_arch in accepted) == ok


def test_boards_json_lists_the_new_arches(run_cli) -> None:  # type: ignore[no-untyped-def]
    code, out, _ = run_cli("boards", "--json")
    assert code == 0
    rows = {(r["arch"], r["machine"]): r for r in json.loads(out)}
    for arch, (name, machine, tty, transport, _) in NEW.items():
        r = rows[arch, machine]
        assert r["console"] == tty and r["virtio"] == transport
        assert r["qemu_binary"] == boards.QEMU_BINARY[arch]
        assert r["default_for_arch"] and name in r["profiles"]
    assert rows["i386", "q35"]["cannot"] == {}
    assert set(rows["ppc64le", "pseries"]["cannot"]) == {"hotplug"}
    assert set(rows["s390x", "s390-ccw-virtio"]["cannot"]) == {"hotplug"}
    assert set(rows["mips64el", "malta"]["cannot"]) == {"hotplug", "powerdown"}
    assert rows["ppc64le", "pseries"]["memory_mib"]["align"] == 256
    assert rows["mips64el", "malta"]["smp"]["max"] == 1


def test_what_boards_cannot_do_is_one_line_each() -> None:
    for b in boards.BOARDS.values():
        for what, why in boards.cannot(b).items():
            assert what in ("hotplug", "powerdown", "migration")
            assert why.startswith(b.machine) or b.machine in why
            assert "\n" not in why


@pytest.mark.parametrize(
    "line",
    [
        # s390 die(): the program check's name, its code and the instruction length
        "[    5.37] illegal operation: 0001 ilc:1 [#1] SMP",
        "[    5.37] specification exception: 0006 ilc:2 [#1] PREEMPT SMP",
        "[    5.37] Oops: 0004 ilc:3 [#1] SMP",
        # mips die(): the reason and a counter alone on the line
        "[    2.00] Oops[#1]:",
        "[    2.00] Kernel bug detected[#1]:",
        "[    2.00] Reserved instruction in kernel code[#1]:",
        "[    2.00] CPU 0 Unable to handle kernel paging request at virtual address 0, epc == 0",
        # powerpc and i386 reuse the common shapes
        "[    1.00] Oops: Kernel access of bad area, sig: 11 [#1]",
        "[    1.00] BUG: Unable to handle kernel data access on read at 0x00000000",
        "[    1.00] BUG: unable to handle page fault for address: 00000000",
    ],
)
def test_oops_shapes_of_each_arch(line: str) -> None:
    p = con.match(line)
    assert p is not None and p.kind == "oops", line


@pytest.mark.parametrize(
    "line",
    [
        "[    0.00] CPU0 revision is: 00018900 (MIPS 5KE)",
        "[    0.23] nvram: Failed to find or create ibm,rtas-log partition, err -28",
        "[    5.55] Freeing unused early sccb memory: 12K",
        "[    0.50] cio: Channel measurement facility initialized using format extended",
        "KASLR disabled: CPU has no PRNG",
        "[    1.00] ppc64le[#1]: something that is no die() line",
    ],
)
def test_ordinary_lines_of_each_arch(line: str) -> None:
    assert con.match(line) is None


def test_a_kernel_message_cutting_into_a_framed_line_is_the_kernels() -> None:
    """A command that writes and then crashes the kernel at once: the framed line's newline
    never comes, and the kernel's next message lands on the same console line."""
    s = con.ConsoleScanner()
    c = s.feed(
        b"QLAUNCH_O:before[    6.959382] sysrq: Trigger a crash\r\n"
        b"[    6.960001] Kernel panic - not syncing: sysrq triggered crash\r\n"
        b"QLAUNCH_O:[    1.000000] a dmesg line the command printed\r\n"
        b"QLAUNCH_E:x [ 1.5] y\r\n"
    )
    assert c.stdout == b"before\n[    1.000000] a dmesg line the command printed\n"
    assert c.stderr == b"x [ 1.5] y\n"
    assert c.console.startswith(b"[    6.959382] sysrq: Trigger a crash\n")
    assert s.finding is not None and s.finding.title == "kernel panic"


def test_a_command_loads_only_what_its_devices_need() -> None:
    from qlaunch.boot import initramfs

    load, pack = initramfs.command_modules("i386", disks=False, nets=False, shares=False)
    assert load == ["evdev", "button"]  # no device needs the virtio transport
    assert pack == []  # what no device of the board needs is not carried either
    load, _ = initramfs.command_modules("s390x", disks=True, nets=True, shares=False)
    assert {"virtio_blk", "ext4", "virtio_net"} <= set(load) and "9p" not in load
    load, _ = initramfs.command_modules("aarch64", disks=False, nets=False, shares=True)
    assert {"virtio_pci", "virtiofs", "9p", "gpio_keys"} <= set(load)
    b = boards.BOARDS["s390x", "s390-ccw-virtio"]
    assert "virtio_pci" not in boards.guest_modules(b, initramfs.DEFAULT_MODULES["i386"])


def test_host_probe_knows_every_arch() -> None:
    from qlaunch.launch import host

    facts = host.probe()
    assert set(facts.qemu) == set(boards.ARCHES)
    hw = host.HostFacts(arch="x86_64", kvm=host.Verdict(True, "/dev/kvm works (kvm_intel)"))
    assert hw.kvm_for("i386").usable  # KVM on x86_64 runs 32-bit guests too
    assert not hw.kvm_for("ppc64le").usable
    assert "KVM cannot run s390x guests" in hw.kvm_for("s390x").reason
