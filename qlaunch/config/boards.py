"""What each (arch, machine) pair needs and allows.

One record per board: the QEMU binary, the CPU, RAM and CPU-count limits, the console, the DTB,
the storage and NIC wiring, and how its poweroff behaves. Validation and argv building both read
these records, so a limit is written down once.

The limits are QEMU 7.2's own (each one was tried against the real binary: QEMU refuses one CPU
or MiB more, or cannot use it, as the comments say), so qlaunch refuses first with a message that
names the profile's file and key instead of QEMU's.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

ARCHES = ("x86_64", "aarch64", "arm", "i386", "ppc64le", "s390x", "mips64el")

QEMU_BINARY = {
    "x86_64": "qemu-system-x86_64",
    "aarch64": "qemu-system-aarch64",
    "arm": "qemu-system-arm",
    "i386": "qemu-system-i386",
    "ppc64le": "qemu-system-ppc64",
    "s390x": "qemu-system-s390x",
    "mips64el": "qemu-system-mips64el",
}

# The package that ships each binary, for hints.
QEMU_PACKAGE = {
    "x86_64": "qemu-system-x86",
    "aarch64": "qemu-system-arm",
    "arm": "qemu-system-arm",
    "i386": "qemu-system-x86",
    "ppc64le": "qemu-system-ppc",
    "s390x": "qemu-system-misc",
    "mips64el": "qemu-system-mips",
}


@dataclass(frozen=True)
class Board:
    machine: str
    arch: str
    description: str
    cpu: str | None  # None: QEMU's default for the machine
    console: str  # the guest's console= device
    machine_opts: tuple[str, ...] = ()
    smp_fixed: int | None = None
    smp_max: int | None = None
    memory_fixed_mib: int | None = None
    memory_max_mib: int | None = None
    memory_default_mib: int = 512
    dtb: str | None = None  # path inside the asset set's dtbs/
    dtb_remove: tuple[str, ...] = ()  # DTB nodes (paths) qlaunch cuts out: see qlaunch.boot.dtb
    storage: tuple[str, ...] = ("virtio",)  # allowed [[disk]] interfaces, first is the default
    virtio: str = "pci"  # virtio transport: pci, mmio, ccw or "" (none)
    nic_model: str | None = "virtio-net-pci"  # None: the board has no NIC
    acpi: bool = True  # system_powerdown reaches the guest through ACPI
    # How system_powerdown reaches the guest, in words; "" where it does not at all.
    powerdown: str = "ACPI power button"
    halts_on_poweroff: bool = False  # poweroff halts the CPU instead of ending QEMU
    extra_serials: int = 0  # serial ports besides the console's, wired to null
    console_serial: int = 0  # which -serial (0, 1, ...) the console is
    append: tuple[str, ...] = ()  # kernel arguments the board needs
    sd_pow2: bool = False  # SD card images must be a power of two in size
    sd_slots: int = 0  # how many if=sd drives the board wires up
    # The board's built-in sound device (a QEMU device type): it gets a silent audiodev, or
    # QEMU probes the host's ALSA and fills stderr with its complaints.
    sound: str | None = None
    tags: tuple[str, ...] = field(default=())
    tsc_hint: bool = False  # under TCG, pass the TSC rate: the guest cannot calibrate it
    # QEMU models less of the board than its DTB describes, so a Debian kernel logs harmless
    # KERN_ERR and KERN_CRIT lines at every boot; a quiet boot then shows only alerts and worse
    # (panics and oopses still show).
    noisy_errors: bool = False
    memory_align_mib: int | None = None  # RAM must be a multiple of this
    # Single-threaded TCG when the board has more vCPUs than the host has cores (see raspi3b).
    tcg_single_thread: bool = False
    migration: bool = True  # save/restore (QEMU migration) works

    @property
    def binary(self) -> str:
        return QEMU_BINARY[self.arch]


def _register(*boards: Board) -> dict[tuple[str, str], Board]:
    return {(b.arch, b.machine): b for b in boards}


BOARDS = _register(
    Board(
        machine="q35",
        arch="x86_64",
        description="PC with PCIe (Q35): virtio everywhere, ACPI",
        cpu=None,
        console="ttyS0",
        smp_max=288,
        memory_default_mib=256,
        storage=("virtio", "scsi", "ide"),
    ),
    Board(
        machine="pc",
        arch="x86_64",
        description="legacy PC (i440FX)",
        cpu=None,
        console="ttyS0",
        smp_max=255,
        memory_default_mib=256,
        storage=("virtio", "scsi", "ide"),
    ),
    Board(
        machine="microvm",
        arch="x86_64",
        description="minimal x86 VM: virtio-mmio, no PCI, fastest boot",
        cpu=None,
        console="ttyS0",
        smp_max=288,
        memory_default_mib=256,
        virtio="mmio",
        nic_model="virtio-net-device",
        # ACPI is what describes the virtio-mmio devices to a Debian kernel (it lacks
        # VIRTIO_MMIO_CMDLINE_DEVICES). It is hardware-reduced ACPI, though: Linux then has no
        # HPET or PM timer, and must measure the TSC against the PIT in a few ms at boot.
        # Under TCG on a busy host (QEMU preempted then) that fails and the guest hangs at
        # once ("tsc: Unable to calibrate against PIT"). tsc_hint: argv then tells the kernel
        # the TSC rate (tsc_early_khz, the host's own under TCG), so nothing is measured.
        machine_opts=("acpi=on",),
        tsc_hint=True,
        append=("reboot=t",),
    ),
    Board(
        machine="virt",
        arch="aarch64",
        description="generic ARM64 VM: virtio-pci, generated DTB",
        cpu="cortex-a57",
        console="ttyAMA0",
        smp_max=8,  # GICv2, QEMU's default interrupt controller for virt
        storage=("virtio", "scsi"),
        acpi=False,
        powerdown="GPIO power key (gpio-keys)",
    ),
    Board(
        machine="virt",
        arch="arm",
        description="generic 32-bit ARM VM: virtio-pci, generated DTB",
        cpu="cortex-a15",
        console="ttyAMA0",
        machine_opts=("highmem=off",),
        smp_max=8,
        # highmem=off keeps RAM below 4 GiB for non-LPAE kernels: RAM starts at 1 GiB.
        memory_max_mib=3072,
        storage=("virtio", "scsi"),
        acpi=False,
        powerdown="GPIO power key (gpio-keys)",
    ),
    Board(
        machine="vexpress-a9",
        arch="arm",
        description="ARM Versatile Express Cortex-A9: SD card, LAN9118",
        cpu="cortex-a9",
        console="ttyAMA0",
        smp_max=4,
        memory_max_mib=1024,  # QEMU: "vexpress-a9: cannot model more than 1GB RAM"
        dtb="vexpress-v2p-ca9.dtb",
        storage=("sd",),
        virtio="",
        nic_model="lan9118",
        acpi=False,
        powerdown="",
        sd_pow2=True,
        sd_slots=1,
        sound="pl041",
        noisy_errors=True,
    ),
    Board(
        machine="vexpress-a15",
        arch="arm",
        description="ARM Versatile Express Cortex-A15: SD card, LAN9118",
        cpu="cortex-a15",
        console="ttyAMA0",
        smp_max=4,  # the tc1 DTB describes two of them; a guest sees no more
        # QEMU's limit; RAM past the first 2 GiB lies above 4 GiB, for LPAE kernels only.
        memory_max_mib=30 * 1024,
        dtb="vexpress-v2p-ca15-tc1.dtb",
        storage=("sd",),
        virtio="",
        nic_model="lan9118",
        acpi=False,
        powerdown="",
        sd_pow2=True,
        sd_slots=1,
        sound="pl041",
        noisy_errors=True,
    ),
    Board(
        machine="raspi3b",
        arch="aarch64",
        description="Raspberry Pi 3 Model B: 4x Cortex-A53, 1 GiB, SD card, no NIC",
        cpu=None,
        # The PL011 on serial0. Not the mini-UART (serial1, ttyS1): QEMU 7.2 ignores its
        # divisor latch, so each baud rate setting prints a stray byte ("X") on the console.
        console="ttyAMA0",
        # QEMU: "The min CPUs supported by machine 'raspi3b' is 4" (and the max),
        # "Invalid RAM size, should be 1 GiB".
        smp_fixed=4,
        memory_fixed_mib=1024,
        memory_default_mib=1024,
        # Until the kernel starts them, the three secondary CPUs wait in the boot stub's WFE
        # loop. Multi-threaded TCG runs each in a host thread that never sleeps (a WFE only
        # yields) and takes QEMU's big lock at every yield: on two host cores they starve the
        # boot CPU, and a run took 3.6 s to 20 s. One TCG thread for all four measured twice
        # as fast and steady (bench/boards). raspi2b hangs at boot that way under QEMU 7.2.
        tcg_single_thread=True,
        dtb="broadcom/bcm2837-rpi-3-b.dtb",
        # The DTB's Bluetooth chip on the PL011 makes the port a serdev bus, not a tty: the
        # console could then be written, never read (no shell). QEMU has no such chip.
        dtb_remove=("/soc/serial@7e201000/bluetooth",),
        storage=("sd",),
        virtio="",
        nic_model=None,
        acpi=False,
        powerdown="",
        halts_on_poweroff=True,
        extra_serials=1,
        sd_pow2=True,
        sd_slots=1,
        noisy_errors=True,
    ),
    Board(
        machine="raspi2b",
        arch="arm",
        description="Raspberry Pi 2 Model B: 4x Cortex-A7, 1 GiB, SD card, no NIC",
        cpu=None,
        console="ttyAMA0",
        smp_fixed=4,
        memory_fixed_mib=1024,
        memory_default_mib=1024,
        dtb="bcm2836-rpi-2-b.dtb",
        storage=("sd",),
        virtio="",
        nic_model=None,
        acpi=False,
        powerdown="",
        halts_on_poweroff=True,
        extra_serials=1,
        sd_pow2=True,
        sd_slots=1,
        noisy_errors=True,
    ),
)

# The four arches below were each booted here with Debian 12's kernel for them (6.1) under TCG.
BOARDS.update(
    _register(
        Board(
            machine="pc",
            arch="i386",
            description="32-bit PC (i440FX) for i686 kernels: virtio, ACPI",
            # QEMU's default qemu32 has no machine check architecture, and the kernel says so at
            # KERN_ERR on every boot ("mce: Unable to init MCE device").
            cpu="pentium3",
            console="ttyS0",
            smp_max=32,  # QEMU takes 255; Debian's 686 kernel has NR_CPUS=32
            # Debian's 686 kernel has no PAE, so it sees RAM below 4 GiB only: pc puts the
            # first 3 GiB there once the RAM reaches 3.5 GiB.
            memory_max_mib=3072,
            memory_default_mib=256,
            storage=("virtio", "scsi", "ide"),
        ),
        Board(
            machine="q35",
            arch="i386",
            description="32-bit PC with PCIe (Q35) for i686 kernels: virtio, ACPI",
            cpu="pentium3",
            console="ttyS0",
            smp_max=32,
            # q35 keeps RAM below 4 GiB only up to 2.75 GiB (then just 2 GiB of it there).
            memory_max_mib=2560,
            memory_default_mib=256,
            storage=("virtio", "scsi", "ide"),
        ),
        Board(
            machine="pseries",
            arch="ppc64le",
            description="IBM POWER (sPAPR) VM, POWER9: virtio-pci, hvc console, no firmware",
            cpu="power9",
            console="hvc0",  # the sPAPR VTY QEMU makes of -serial
            # x-vof: QEMU's Virtual Open Firmware instead of SLOF boots the kernel in half
            # the time (8 s against 17 s) and prints nothing of its own; it cannot boot a
            # disk, which qlaunch does only with UEFI anyway. The caps TCG cannot give are
            # said off, or QEMU warns about each at every start.
            machine_opts=(
                "x-vof=on",
                "cap-cfpc=broken",
                "cap-sbbc=broken",
                "cap-ibs=broken",
                "cap-ccf-assist=off",
            ),
            smp_max=2048,  # QEMU sets no limit; Debian's kernel has NR_CPUS=2048
            memory_default_mib=512,
            # QEMU: "Memory size 0x12c00000 is not aligned to 256 MiB"
            memory_align_mib=256,
            storage=("virtio", "scsi"),
            acpi=False,
            # An EPOW interrupt: the kernel runs /sbin/poweroff.
            powerdown="EPOW interrupt (the kernel runs /sbin/poweroff)",
            # VOF leaves the NVRAM unformatted, and the kernel says so at KERN_ERR each boot.
            noisy_errors=True,
        ),
        Board(
            machine="s390-ccw-virtio",
            arch="s390x",
            description="IBM Z VM: virtio-ccw channel devices, SCLP console, no PCI",
            cpu=None,  # TCG's "qemu" model runs Debian's (z196 and later) kernel
            console="ttysclp0",  # the SCLP VT220 console QEMU makes of -serial
            smp_max=248,  # QEMU: "The max CPUs supported by machine 's390-ccw-virtio' is 248"
            memory_default_mib=512,
            storage=("virtio", "scsi"),
            virtio="ccw",
            nic_model="virtio-net-ccw",
            acpi=False,
            # A quiesce signal, which the kernel answers with ctrl-alt-del: a restart, and
            # -no-reboot ends QEMU (no sync first: use poweroff in the guest for that).
            powerdown="SCLP quiesce signal (the kernel restarts, so QEMU ends)",
            # The TCG CPU has no random number facility, so the decompressor says on every boot
            # that KASLR is off; it says nothing when asked for none.
            append=("nokaslr",),
        ),
        Board(
            machine="malta",
            arch="mips64el",
            description="MIPS Malta: MIPS64 5KEc, virtio-pci behind its GT-64120, IDE",
            cpu="5KEc",  # what Debian's 5kc-malta flavour is built for
            console="ttyS0",
            # QEMU takes 16, but a 5KEc has no multi-threading or CPS: the kernel sees one.
            smp_max=1,
            memory_max_mib=2048,  # QEMU: "Too much memory for this machine: 2049MB, maximum 2048MB"
            memory_default_mib=256,
            storage=("virtio", "scsi", "ide"),
            acpi=False,
            # QEMU raises a power button on the PIIX4, but Linux on MIPS has no ACPI to read it.
            powerdown="",
            # The kernel cannot parse its own built-in certificate list (KERN_ERR, every boot).
            # Its first lines show even so: the boot console starts before `quiet` is read.
            noisy_errors=True,
        ),
    )
)

DEFAULT_MACHINE = {
    "x86_64": "q35",
    "aarch64": "virt",
    "arm": "virt",
    "i386": "pc",
    "ppc64le": "pseries",
    "s390x": "s390-ccw-virtio",
    "mips64el": "malta",
}

# Guest modules that serve only virtio devices, or the SCSI and CD-ROM a board gets only over
# virtio. Each insmod costs TCG time: on raspi2b (4 vCPUs of 32-bit ARM) loading these took 6 s
# of a 21 s run for nothing.
VIRTIO_MODULES = frozenset(
    {
        "virtio_pci",
        "virtio_mmio",
        "virtio_blk",
        "virtio_scsi",
        "virtio_net",
        "virtio_console",
        "virtio_rng",
        "9p",
        "9pnet_virtio",
        "netfs",
        "virtiofs",
        "iso9660",
        "sr_mod",
        "sd_mod",
    }
)


# The guest driver of each virtio transport: (kernel config option, module name). s390's
# virtio-ccw driver is built by S390_GUEST, and is no module in Debian's kernel.
VIRTIO_BUS = {
    "pci": ("VIRTIO_PCI", "virtio_pci"),
    "mmio": ("VIRTIO_MMIO", "virtio_mmio"),
    "ccw": ("S390_GUEST", "virtio_ccw"),
}


def guest_modules(board: Board, modules: Iterable[str]) -> list[str]:
    """The initramfs's default modules that can serve something on this board: no virtio
    modules without virtio, and of the transports' drivers only the board's own."""
    other_buses = {mod for t, (_, mod) in VIRTIO_BUS.items() if t != board.virtio}
    return [
        m
        for m in modules
        if (board.virtio or m not in VIRTIO_MODULES) and (not board.virtio or m not in other_buses)
    ]


# The machines qlaunch.vm.hotplug plugs devices into: q35's root ports, pc's root bus.
HOTPLUG_MACHINES = ("q35", "pc")


def cannot(board: Board) -> dict[str, str]:
    """What a board cannot do, each with the one line that refuses it ("hotplug", "powerdown",
    "migration"); empty when it can do all three."""
    out: dict[str, str] = {}
    if board.machine not in HOTPLUG_MACHINES:
        why = "has no PCI bus" if board.virtio != "pci" else "gets no hotplug ports from qlaunch"
        out["hotplug"] = f"{board.machine} {why}, so nothing can be plugged in while it runs"
    if not board.powerdown:
        out["powerdown"] = (
            f"{board.machine} has no way to ask the guest to power off (system_powerdown "
            "does nothing there)"
        )
    if not board.migration:
        out["migration"] = f"QEMU cannot migrate {board.machine}, so it cannot be saved"
    return out


def board_for(arch: str, machine: str) -> Board | None:
    return BOARDS.get((arch, machine))


def machines_for(arch: str) -> list[str]:
    return [m for (a, m) in BOARDS if a == arch]
