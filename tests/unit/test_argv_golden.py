"""Golden argv: one file per case, one option per line. QLAUNCH_REGEN_GOLDEN=1 rewrites them."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from qlaunch.config import profile
from qlaunch.launch import argv as argvmod
from qlaunch.launch import resolve
from qlaunch.launch.host import HostFacts, Verdict

HERE = Path(__file__).parent
GOLDEN = HERE / "golden"
CASES = HERE / "cases"
PROFILES = HERE.parent.parent / "profiles"
REGEN = os.environ.get("QLAUNCH_REGEN_GOLDEN") == "1"

NO_KVM = HostFacts(arch="x86_64", kvm=Verdict(False, "/dev/kvm is provided by kvm_pvm"))
HW_KVM = HostFacts(arch="x86_64", kvm=Verdict(True, "/dev/kvm works (kvm_intel)"))
ARM_KVM = HostFacts(arch="aarch64", kvm=Verdict(True, "/dev/kvm works (kvm)"))
TSC = HostFacts(arch="x86_64", kvm=NO_KVM.kvm, tsc_khz=2596100)
HOSTS = {"": NO_KVM, "kvm": HW_KVM, "armkvm": ARM_KVM, "tsc": TSC}


def one_option_per_line(argv: list[str]) -> str:
    lines = [argv[0]]
    i = 1
    while i < len(argv):
        if i + 1 < len(argv) and not argv[i + 1].startswith("-"):
            lines.append(f"{argv[i]} {argv[i + 1]}")
            i += 2
        else:
            lines.append(argv[i])
            i += 1
    return "\n".join(lines) + "\n"


def cases() -> list[tuple[str, Path, str]]:
    out = [(p.stem, p, "") for p in sorted(PROFILES.glob("*.toml"))]
    for p in sorted(CASES.glob("*.toml")):
        host = p.stem.split("@")[1] if "@" in p.stem else ""
        out.append((p.stem, p, host))
    return out


def render(path: Path, host: str) -> str:
    prof = profile.load(str(path))
    files = resolve.refs(prof, Path("/cache"))
    initrd = "/cache/initramfs/qlaunch.cpio.gz" if files.initrd == "qlaunch" else files.initrd
    rt = argvmod.Runtime(name=prof.name, kernel=files.kernel, initrd=initrd, dtb=files.dtb)
    return one_option_per_line(argvmod.build_argv(prof, HOSTS[host], rt))


@pytest.mark.parametrize(("name", "path", "host"), cases(), ids=[c[0] for c in cases()])
def test_golden(name: str, path: Path, host: str) -> None:
    got = render(path, host)
    golden = GOLDEN / f"{name}.argv"
    if REGEN:
        golden.write_text(got)
    assert golden.exists(), f"no golden file {golden}: run `make golden` and review the diff"
    assert got == golden.read_text()


def test_no_unused_golden_files() -> None:
    names = {c[0] for c in cases()}
    unused = sorted(p.name for p in GOLDEN.glob("*.argv") if p.stem not in names)
    if REGEN:
        for n in unused:
            (GOLDEN / n).unlink()
        unused = []
    assert not unused, f"golden files without a case: {unused}"
