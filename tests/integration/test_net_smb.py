"""SMB sharing on QEMU's user networking ([[net]] smb = "DIR"), as the guest sees it.

QEMU runs the host's smbd (package samba) on a private configuration and the guest reaches it
at 10.0.2.4; nothing leaves QEMU's user network. The cloud kernel's cifs client needs its
crypto modules in the initramfs, which [boot] modules adds.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.boot

CIFS_MODULES = (
    '["cmac", "ccm", "gcm", "ctr", "ecb", "seqiv", "ghash_generic", "sha512_generic", '
    '"des_generic", "md4", "cifs"]'
)


def test_guest_mounts_the_smb_share(qlaunch_bin: list[str], tmp_path: Path) -> None:
    if not shutil.which("smbd", path="/usr/sbin:/usr/bin:/sbin:/bin"):
        pytest.fail("smbd is missing: .ci/setup-host installs samba for this test")
    share = tmp_path / "share"
    share.mkdir()
    (share / "hello.txt").write_text("from the host\n")
    guest = (
        "mkdir -p /mnt/smb && "
        "mount -t cifs //10.0.2.4/qemu /mnt/smb -o username=guest,password=,vers=3.0 && "
        "cat /mnt/smb/hello.txt && echo from the guest > /mnt/smb/back.txt && umount /mnt/smb"
    )
    r = subprocess.run(
        [
            *qlaunch_bin,
            "run",
            "default",
            "--set",
            "net.0.mode=user",
            "--set",
            f"net.0.smb={share}",
            "--set",
            "boot.append=qlaunch.dhcp",
            "--set",
            f"boot.modules={CIFS_MODULES}",
            "--",
            "sh",
            "-c",
            guest,
        ],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "from the host" in r.stdout
    assert (share / "back.txt").read_text() == "from the guest\n"
