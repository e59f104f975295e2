"""qlaunch.launch.host's KVM and TSC probes on fake /dev, /sys and /proc trees: which modules
stand behind /dev/kvm decides whether `accel = "auto"` takes KVM, and why not is said."""

from __future__ import annotations

from pathlib import Path

import pytest

from qlaunch.launch import host

CPUINFO = """\
processor\t: 0
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC
cpu MHz\t\t: 2596.136
flags\t\t: fpu vme de pse tsc msr pae constant_tsc rep_good nopl nonstop_tsc tsc_known_freq
"""


def tree(root: Path, modules: list[str], kvm: bool = True) -> Path:
    """A fake root: /dev/kvm (a plain file) and /sys/module/NAME for each module."""
    (root / "dev").mkdir(parents=True)
    if kvm:
        (root / "dev/kvm").write_text("")
    for m in modules:
        (root / "sys/module" / m).mkdir(parents=True)
    return root


class CreateVM:
    """The injected KVM_CREATE_VM check: records the device it was asked about."""

    def __init__(self, why: str | None = None) -> None:
        self.why = why
        self.asked: list[str] = []

    def __call__(self, dev: str) -> str | None:
        self.asked.append(dev)
        return self.why


@pytest.mark.parametrize("vendor", ["kvm_intel", "kvm_amd"])
def test_hardware_kvm_is_usable(tmp_path: Path, vendor: str) -> None:
    check = CreateVM()
    v = host.probe_kvm(tree(tmp_path, ["kvm", vendor]), check, arch="x86_64")
    assert v == host.Verdict(True, f"/dev/kvm works ({vendor})")
    assert check.asked == [str(tmp_path / "dev/kvm")]


def test_kvm_pvm_is_not_usable_although_a_vm_can_be_made(tmp_path: Path) -> None:
    check = CreateVM()
    v = host.probe_kvm(tree(tmp_path, ["kvm", "kvm_pvm"]), check, arch="x86_64")
    assert not v.usable
    assert v.reason == (
        "/dev/kvm is provided by kvm_pvm, not kvm_intel/kvm_amd (no VMX/SVM): "
        "standard guest kernels hang under it"
    )
    assert check.asked, "KVM_CREATE_VM was not even tried"


def test_missing_dev_kvm(tmp_path: Path) -> None:
    check = CreateVM()
    v = host.probe_kvm(tree(tmp_path, ["kvm", "kvm_intel"], kvm=False), check, arch="x86_64")
    assert not v.usable and v.reason.startswith("/dev/kvm does not exist")
    assert check.asked == []


def test_a_failed_create_vm_wins_over_the_modules(tmp_path: Path) -> None:
    why = "cannot open /dev/kvm read-write: Permission denied (add yourself to the kvm group)"
    v = host.probe_kvm(tree(tmp_path, ["kvm", "kvm_intel"]), CreateVM(why), arch="x86_64")
    assert v == host.Verdict(False, why)


def test_no_vendor_module(tmp_path: Path) -> None:
    root = tree(tmp_path, ["kvm"])
    v = host.probe_kvm(root, CreateVM(), arch="x86_64")
    assert not v.usable and "no hardware KVM module" in v.reason
    # On arm64, KVM is part of the kernel proper: `kvm` alone is the real thing.
    assert host.probe_kvm(root, CreateVM(), arch="aarch64") == host.Verdict(
        True, "/dev/kvm works (kvm)"
    )


def test_the_real_create_vm_check_on_files_that_are_not_kvm(tmp_path: Path) -> None:
    """The default check really issues KVM_CREATE_VM: on a plain file the ioctl fails, and a
    missing device cannot be opened; both say so about /dev/kvm."""
    f = tmp_path / "kvm"
    f.write_text("")
    why = host.kvm_create_vm(str(f))
    assert why is not None and why.startswith("KVM_CREATE_VM on /dev/kvm failed: ")
    why = host.kvm_create_vm(str(tmp_path / "absent"))
    assert why is not None and why.startswith("cannot open /dev/kvm read-write: ")
    root = tree(tmp_path / "r", ["kvm", "kvm_intel"])
    v = host.probe_kvm(root, arch="x86_64")
    assert not v.usable and v.reason.startswith("KVM_CREATE_VM on /dev/kvm failed")


def test_kvm_for_a_foreign_guest() -> None:
    facts = host.HostFacts(arch="x86_64", kvm=host.Verdict(True, "/dev/kvm works (kvm_amd)"))
    assert facts.kvm_for("x86_64").usable
    v = facts.kvm_for("aarch64")
    assert not v.usable and v.reason == "KVM cannot run aarch64 guests on this x86_64 host"


def test_tsc_rate_only_where_the_tsc_is_constant(tmp_path: Path) -> None:
    assert host.probe_tsc_khz(tmp_path) is None  # no /proc/cpuinfo at all
    (tmp_path / "proc").mkdir()
    cpuinfo = tmp_path / "proc/cpuinfo"
    cpuinfo.write_text(CPUINFO)
    assert host.probe_tsc_khz(tmp_path) == 2596136
    cpuinfo.write_text(CPUINFO.replace(" constant_tsc", ""))
    assert host.probe_tsc_khz(tmp_path) is None
    cpuinfo.write_text(CPUINFO.replace("cpu MHz", "bogomips"))
    assert host.probe_tsc_khz(tmp_path) is None
