"""Warm start, the pure part: what may be warm, what a warm image is keyed by, and what a
restored guest is sent for its run. The I/O (build, cache, restore) is qlaunch.vm.warm.

A warm image is the guest saved (QEMU migration) while qlaunch's init waits, after the boot
and the module loads, for its run on the console. Everything that shapes that state is in the
key: the QEMU binary, the argv both sides share (no per-run part is in it), and the content
of every file that argv names.
"""

from __future__ import annotations

import base64
import hashlib
import json
import shlex
from collections.abc import Mapping, Sequence

from qlaunch.boot import reseed
from qlaunch.config import boards
from qlaunch.config.profile import Profile
from qlaunch.errors import UsageError

KEY_VERSION = 1
READY = "QLAUNCH_WARM_READY"
BEGIN = "QLAUNCH_WARM_BEGIN"
END = "QLAUNCH_WARM_END"
# Sent before BEGIN: the bytes QEMU hands the UART before it has loaded the saved state
# (one, with the FIFO off as after a reset) are lost when that state replaces the UART's.
LEAD = b"\n" * 32
KERNEL_ARG = "qlaunch.warm"
SEED = "/run/qlaunch.seed"
RESEED = "bin/qlaunch-reseed"  # in the initramfs


# Boards QEMU 7.2 migrates but whose restored guest never runs again here: after a restore
# (of a live or a stopped save, alike) the CPU of vexpress-a9 and -a15 stays in WFI and no
# interrupt (UART, timer) wakes it, so the run would hang.
_NO_WAKE = (
    "a {} guest restored by QEMU 7.2 takes no interrupt (its CPU stays idle), so it cannot "
    "be made warm"
)
NOT_WARM = {("arm", m): _NO_WAKE.format(m) for m in ("vexpress-a9", "vexpress-a15")}


def refusal(profile: Profile, has_cmd: bool) -> str | None:
    """Why this profile cannot run warm (one line), or None. A warm image is shared by runs,
    so whatever a run could change for the next one, or that lives outside QEMU, refuses."""
    if not has_cmd:
        return "--warm needs a command (qlaunch run PROFILE --warm -- CMD)"
    if profile.boot.initrd != "qlaunch":
        return f"--warm: profile {profile.name} boots its own initrd, not qlaunch's init"
    cannot = boards.cannot(profile.board).get("migration") or NOT_WARM.get(
        (profile.machine.arch, profile.board.machine)
    )
    if cannot:
        return f"--warm: {cannot}"
    if not reseed.supported(profile.machine.arch):
        return (
            f"--warm: qlaunch has no crng reseed helper for {profile.machine.arch} guests, "
            "so restored runs would repeat their randomness"
        )
    for i, d in enumerate(profile.disks):
        if d.cloud_init_seed:
            return f"--warm: disk {i} is a cloud-init seed, made for each run"
        if not (d.readonly or d.snapshot):
            return (
                f"--warm: disk {i} ({d.path}) is writable and persistent: a warm image cannot "
                "share it between runs (set snapshot = true or readonly = true)"
            )
    for i, n in enumerate(profile.nets):
        if n.mode not in ("none", "user"):
            return f"--warm: NIC {i} is on a tap ({n.mode}), whose lease a restore would repeat"
    if profile.shares:
        return "--warm: [[share]] mounts a host directory, which QEMU cannot migrate"
    if profile.machine.tpm:
        return "--warm: [machine] tpm keeps its state in swtpm, outside the warm image"
    if profile.boot.firmware.startswith("uefi"):
        return "--warm: UEFI keeps its variables in a store of each run's own"
    if profile.resources.hugepages:
        return "--warm: [resources] hugepages are not supported warm"
    return None


def check(profile: Profile, has_cmd: bool) -> None:
    why = refusal(profile, has_cmd)
    if why:
        raise UsageError(why, hint="run it without --warm")


def key(
    binary_identity: str,
    argv: Sequence[str],
    file_hashes: Mapping[str, str],
) -> str:
    """The warm image's key: the QEMU binary (path and version or stat), the shared argv,
    and a content hash for each file it names (path -> sha256)."""
    doc = {
        "v": KEY_VERSION,
        "qemu": binary_identity,
        "argv": list(argv),
        "files": dict(sorted(file_hashes.items())),
    }
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()


def named_files(argv: Sequence[str]) -> list[str]:
    """The files an argv boots from: -kernel, -initrd, -dtb, -bios, and each drive's file."""
    out = []
    for opt, val in zip(argv, argv[1:], strict=False):
        if opt in ("-kernel", "-initrd", "-dtb", "-bios"):
            out.append(val)
        elif opt == "-drive":
            for part in val.replace(",,", "\0").split(","):
                if part.startswith("file.filename="):
                    out.append(part.split("=", 1)[1].replace("\0", ","))
    return out


def payload(
    command_script: str,
    *,
    hostname: str | None = None,
    epoch: float,
    seed: bytes,
) -> bytes:
    """What the host writes on the console of a restored guest: base64 lines, then END.
    The script sets the clock, reseeds the crng, names the host and writes the command."""
    if len(seed) != reseed.SEED_BYTES:
        raise ValueError(f"seed: {len(seed)} bytes, want {reseed.SEED_BYTES}")
    octal = "".join(f"\\{b:03o}" for b in seed)
    lines = [
        f"date -u -s @{round(epoch)} >/dev/null",
        f"printf '{octal}' >{SEED}",
        f'/{RESEED} <{SEED} >/dev/urandom || log "crng reseed failed: errno $?"',
        # Emptied by a builtin (an rm is a process: 15 ms under TCG on aarch64).
        f": >{SEED}",
        *([f"name={shlex.quote(hostname)}"] if hostname else []),
        f"printf '%s' {shlex.quote(command_script)} >/qlaunch/cmd",
    ]
    script = ("\n".join(lines) + "\n").encode()
    b64 = base64.encodebytes(script)  # 76-character lines: far below the tty's 4095
    return LEAD + BEGIN.encode() + b"\n" + b64 + END.encode() + b"\n"
