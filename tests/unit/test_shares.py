"""Shares, pure: which kind each gets and why, [[share]] in profiles, and what the plan makes
of them (virtiofsd helpers, guest RAM on a shared backend, the init's mount parameters)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from qlaunch.config import profile
from qlaunch.errors import HostError, ProfileError, UsageError
from qlaunch.launch import plan, shares
from qlaunch.launch.host import HostFacts, Verdict

ROOT = HostFacts(
    arch="x86_64",
    kvm=Verdict(False, "test"),
    virtiofsd="/usr/lib/qemu/virtiofsd",
    root=True,
)


def write(tmp_path: Path, body: str) -> str:
    p = tmp_path / "p.toml"
    p.write_text('extends = "default"\n' + body)
    return str(p)


@pytest.mark.parametrize(
    ("host", "want", "readonly", "kind", "why"),
    [
        (ROOT, "auto", False, "virtiofs", None),
        (ROOT, "9p", False, "9p", None),
        (ROOT, "auto", True, "9p", "virtiofsd cannot export a directory read-only"),
        (replace(ROOT, virtiofsd=None), "auto", False, "9p", "virtiofsd is not installed"),
        (replace(ROOT, root=False), "auto", False, "9p", "virtiofsd needs root"),
    ],
)
def test_choice_and_the_reason_for_9p(
    host: HostFacts, want: str, readonly: bool, kind: str, why: str | None
) -> None:
    got_kind, got_why = shares.choose(want, readonly, host)
    assert got_kind == kind
    assert (got_why is None) if why is None else (got_why or "").startswith(why)
    if got_why:
        assert "\n" not in got_why


def test_virtiofs_asked_for_where_it_cannot_be_had_is_an_error() -> None:
    with pytest.raises(UsageError, match="virtiofsd needs root"):
        shares.choose("virtiofs", False, replace(ROOT, root=False))


def test_profile_shares_validate(tmp_path: Path) -> None:
    p = profile.load(write(tmp_path, '[[share]]\npath = "src"\n[[share]]\npath = "/d"\ntag = "d"'))
    assert [(s.path, s.tag, s.guest, s.type) for s in p.shares] == [
        ("src", "share0", "/mnt/share0", "auto"),
        ("/d", "d", "/mnt/d", "auto"),
    ]
    bad = {
        '[[share]]\ntag = "x"': "path: required",
        '[[share]]\npath = "a"\ntag = "no spaces"': "is not a mount tag",
        '[[share]]\npath = "a"\n[[share]]\npath = "b"\ntag = "share0"': "tag of an earlier",
        '[[share]]\npath = "a"\nguest = "rel"': "must be an absolute path",
        '[[share]]\npath = "a"\nreadonly = true\ntype = "virtiofs"': "cannot export",
        '[[share]]\npath = "a"\ntype = "nfs"': "not one of auto, virtiofs, 9p",
        '[[share]]\npath = "a"\nsize = 1': "unknown key 'size'",
    }
    for body, message in bad.items():
        with pytest.raises(ProfileError, match=message):
            profile.load(write(tmp_path, body))


def test_a_share_needs_a_virtio_board(tmp_path: Path) -> None:
    p = tmp_path / "b.toml"
    p.write_text('extends = "vexpress-a9"\n[[share]]\npath = "/x"\n')
    with pytest.raises(ProfileError, match="no virtio transport"):
        profile.load(str(p))


def test_start_plan_runs_virtiofsd_beside_qemu(tmp_path: Path) -> None:
    body = '[[share]]\npath = "/src"\n[[share]]\npath = "/ro"\nreadonly = true\n'
    p = profile.load(write(tmp_path, body))
    rt = plan.wire("start", "vm1", statedir="/run/ql/vm1")
    lp = plan.build(p, ROOT, "start", rt)
    (h,) = lp.helpers
    assert h.argv[:2] == ("/usr/lib/qemu/virtiofsd", "--socket-path=/run/ql/vm1/virtiofs0.sock")
    assert "source=/src" in h.argv
    assert h.ready == "/run/ql/vm1/virtiofs0.sock" and h.log == "/run/ql/vm1/virtiofs0.log"
    argv = " ".join(lp.argv)
    assert "memory-backend-memfd,id=qlaunch-ram,size=256M,share=on" in argv
    assert "memory-backend=qlaunch-ram" in argv
    assert "vhost-user-fs-pci,chardev=qlfs0,tag=share0" in argv
    assert "virtio-9p-pci,fsdev=qlfs1,mount_tag=share1" in argv
    assert "qlaunch.virtiofs=share0:/mnt/share0 qlaunch.9p=share1:/mnt/share1" in argv
    # A read-only share is 9p by design: no note. The socket is in the plan's sockets.
    assert lp.notes == ()
    assert "/run/ql/vm1/virtiofs0.sock" in [s.path for s in lp.sockets]


def test_fallback_in_a_plan_says_why_and_needs_no_virtiofsd(tmp_path: Path) -> None:
    p = profile.load(write(tmp_path, '[[share]]\npath = "/src"\n'))
    lp = plan.build(p, replace(ROOT, virtiofsd=None), "run", plan.wire("run", "x"))
    assert lp.helpers == ()
    assert "memory-backend" not in " ".join(lp.argv)
    assert "-fsdev" in lp.argv
    assert lp.notes == (
        "[[share]] share0 (/src) over 9p, not virtiofs: virtiofsd is not installed "
        "(/usr/lib/qemu/virtiofsd: apt-get install qemu-system-common)",
    )


def test_hugepages_with_virtiofs_share_the_hugepage_backend(tmp_path: Path) -> None:
    body = '[resources]\nhugepages = true\n[[share]]\npath = "/src"\n'
    lp = plan.build(profile.load(write(tmp_path, body)), ROOT, "run", plan.wire("run", "x"))
    argv = " ".join(lp.argv)
    assert "memory-backend-file,id=qlaunch-ram" in argv and "prealloc=on,share=on" in argv
    assert "memory-backend-memfd" not in argv


def test_virtiofsd_cannot_take_a_comma(tmp_path: Path) -> None:
    p = profile.load(write(tmp_path, '[[share]]\npath = "/a,b"\ntype = "virtiofs"\n'))
    with pytest.raises(UsageError, match="comma"):
        plan.build(p, ROOT, "run", plan.wire("run", "x"))


def test_virtiofs_asked_for_without_virtiofsd_is_the_hosts_error(tmp_path: Path) -> None:
    p = profile.load(write(tmp_path, '[[share]]\npath = "/src"\ntype = "virtiofs"\n'))
    with pytest.raises((UsageError, HostError), match="not installed"):
        plan.build(p, replace(ROOT, virtiofsd=None), "run", plan.wire("run", "x"))


def test_a_low_descriptor_limit_is_named_once_virtiofs_is_used() -> None:
    # virtiofsd holds a descriptor per inode the guest holds: a 20,000 hard limit (this kind
    # of sandbox) ends a walk of a larger tree in EMFILE, which the user should hear of.
    note = shares.fd_limit_note(20000)
    assert note is not None and "at most 20000 files open" in note and "EMFILE" in note
    assert shares.fd_limit_note(shares.FD_WANTED) is None
    assert shares.fd_limit() > 0
