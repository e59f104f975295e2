"""The Debian 12 images `qlaunch image build` makes, booted through UEFI as a user boots them:
x86_64 (q35, OVMF) and aarch64 (virt, cortex-a57, AAVMF), to an ssh login through `qlaunch ssh
NAME -- uname -m`. One boot per image serves every check of that image: the guest booted
through the firmware (it sees EFI and its own root), a variable the guest's Linux writes goes
into the VM's own store, `stop` goes through the guest agent, and after the next start on the
same disk both the file written just before the stop and the variable are still there.

The x86_64 BIOS image boots in test_guest_agent_boot.py (agent, addresses, snapshots). The
images come from `make test-images` (built once per recipe, see debimage.py).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from debimage import debian_image, overlay
from vmlab import ok, ql, reap_all, row

from qlaunch import paths

pytestmark = [pytest.mark.boot, pytest.mark.slow]

STOP_WAIT = "400"
SSH_WAIT = "900"  # a whole Debian under TCG on two shared cores, aarch64 the slowest
# An EFI variable of a GUID of our own; efivarfs takes the attributes (NV+BS+RT = 7) first.
VAR = "QlaunchImage-8c0e2f4a-51d6-4b7e-a3c9-6e1d0b2f7a45"
EFIVARS = "/sys/firmware/efi/efivars"

MACHINES = {
    "x86_64": '[machine]\narch = "x86_64"\nmachine = "q35"\n',
    "aarch64": '[machine]\narch = "aarch64"\nmachine = "virt"\ncpu = "cortex-a57"\n',
}


@dataclass
class Guest:
    arch: str
    name: str
    profile: Path
    root: Path  # QLAUNCH_STATE
    env: dict[str, str]  # QLAUNCH_STATE, _DATA and _CONFIG of the module's VM
    first_boot: float  # seconds from `qlaunch start` to the first ssh login that worked


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _ssh_key(work: Path) -> str:
    argv = ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "qlaunch-test"]
    subprocess.run([*argv, "-f", str(work / "id")], check=True)
    return (work / "id.pub").read_text().strip()


def boot(g: Guest) -> float:
    """`qlaunch start`, then `qlaunch ssh --wait -- uname -m`; the seconds that took."""
    t0 = time.monotonic()
    ok("start", str(g.profile), "--name", g.name)
    r = ql("ssh", g.name, "--wait", SSH_WAIT, "--", "uname", "-m", timeout=1200)
    assert r.returncode == 0, f"ssh -> {r.returncode}: {r.stderr}\n{console(g)}"
    assert r.stdout.strip() == g.arch, (r.stdout, console(g))
    return time.monotonic() - t0


def console(g: Guest) -> str:
    """The end of what the console printed (firmware screens are not always UTF-8)."""
    return (g.root / g.name / "console.log").read_bytes()[-3000:].decode(errors="replace")


def sh(g: Guest, script: str) -> str:
    r = ql("ssh", g.name, "--", script, timeout=120)
    assert r.returncode == 0, (script, r.returncode, r.stdout, r.stderr)
    return r.stdout


@pytest.fixture(scope="module", params=["x86_64", "aarch64"])
def guest(request: pytest.FixtureRequest) -> Iterator[Guest]:
    arch = request.param
    base = debian_image(arch, "uefi")
    work = Path(tempfile.mkdtemp(prefix=f"qlimg-{arch}-", dir="/tmp"))
    # Module scope runs before the per-test environment (conftest): set all of it here.
    env = {"QLAUNCH_STATE": work / "st", "QLAUNCH_DATA": work / "data"}
    env["QLAUNCH_CONFIG"] = work / "config"
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update({k: str(v) for k, v in env.items()})
    try:
        disk = overlay(base, work / "disk.qcow2")
        pub = _ssh_key(work)
        profile = work / f"deb-{arch}.toml"
        port = _free_port()  # qlaunch ssh finds the forward in the profile
        profile.write_text(
            MACHINES[arch]
            + 'memory = "1G"\nsmp = 2\n'
            + '[boot]\nfirmware = "uefi"\n'
            + f'[[disk]]\npath = "{disk}"\n'
            + f'[[net]]\nmode = "user"\nforward = ["tcp:127.0.0.1:{port}-:22"]\n'
            + f'[cloud-init]\nhostname = "{arch.replace("_", "-")}-uefi"\n'
            + f"ssh_authorized_keys = [{json.dumps(pub)}]\n"
        )
        g = Guest(arch, f"img-{arch}", profile, work / "st", {k: str(v) for k, v in env.items()}, 0)
        g.first_boot = boot(g)
        print(f"\n{arch} uefi: qlaunch start to the first ssh login: {g.first_boot:.1f} s")
        yield g
    finally:
        reap_all(work / "st")
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        shutil.rmtree(work, ignore_errors=True)


@pytest.fixture(autouse=True)
def _guest_env(guest: Guest, _isolated_config: None, monkeypatch: pytest.MonkeyPatch) -> None:
    # Each test's own data directory (conftest) would be a new variable store for the VM.
    for k, v in guest.env.items():
        monkeypatch.setenv(k, v)


def test_booted_through_uefi_from_its_own_disk(guest: Guest) -> None:
    # No kernel in the profile: GRUB from the ESP started this kernel, which the firmware
    # handed its EFI system table, and the root is the image's own file system.
    out = sh(guest, "test -d /sys/firmware/efi && echo efi; findmnt -no SOURCE,FSTYPE /")
    assert out.splitlines()[0] == "efi", out
    assert out.splitlines()[1].split()[1] == "ext4", out
    # GRUB's own mark on the command line: no direct kernel boot slipped in.
    cmdline = sh(guest, "cat /proc/cmdline")
    assert "root=UUID=" in cmdline and "BOOT_IMAGE=/boot/vmlinuz-" in cmdline, cmdline


def test_stop_through_the_agent_keeps_files_and_uefi_variables(guest: Guest) -> None:
    store = paths.vm_data_dir(guest.name) / "efivars.fd"
    assert store.is_file()
    # The guest's Linux writes a variable; the firmware keeps it in the VM's store (a
    # pflash device QEMU writes through), like any boot entry an installer would add.
    sh(
        guest,
        f"printf '\\007\\000\\000\\000kept' | sudo tee {EFIVARS}/{VAR} >/dev/null && "
        "echo written-before-stop > /home/debian/mark",  # no sync: a clean shutdown writes it
    )
    # A slow host's guest may take minutes to power off: room for it, so the agent's step is
    # the one that ends the VM (ACPI would come next after the timeout).
    r = ok("stop", guest.name, "--json", "--timeout", STOP_WAIT, timeout=900)
    report = json.loads(r.stdout)
    assert report["steps"][0]["action"] == "agent shutdown", report
    assert report["steps"][0]["result"] == "the guest powered off", report
    assert report["exit"]["reason"] == "guest-shutdown", report
    assert row(guest.name)["state"] == "stopped"
    assert "QlaunchImage".encode("utf-16-le") in store.read_bytes()

    secs = boot(guest)  # the same name: the same variable store, the same disk
    print(f"\n{guest.arch} uefi: second boot to ssh: {secs:.1f} s")
    assert sh(guest, "cat /home/debian/mark").strip() == "written-before-stop"
    got = sh(guest, f"tail -c 4 {EFIVARS}/{VAR}; echo")
    assert got.strip() == "kept", got
    r = ok("stop", guest.name, "--timeout", STOP_WAIT, timeout=900)
    assert "agent shutdown: the guest powered off" in r.stderr, r.stderr
