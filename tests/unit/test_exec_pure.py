"""`qlaunch exec` without QEMU: kernel headers, --share, --modules trees, matrix files, JUnit."""

from __future__ import annotations

import gzip
import json
import struct
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from qlaunch.boot import kernel
from qlaunch.errors import UsageError
from qlaunch.testloop import driver as testloop
from qlaunch.testloop import matrix


def bzimage(xloadflags: int = 1, version: int = 0x20F) -> bytes:
    head = bytearray(0x400)
    head[0x1F1] = 4
    head[0x202:0x206] = b"HdrS"
    struct.pack_into("<H", head, 0x206, version)
    struct.pack_into("<H", head, 0x236, xloadflags)
    struct.pack_into("<H", head, 0x20E, 0x100)  # version string at 0x300
    head[0x300:0x320] = b"6.9.0-test (me@host) #1 SMP\0"
    return bytes(head)


def arm64_image() -> bytes:
    head = bytearray(0x100)
    head[0x38:0x3C] = b"ARM\x64"
    return bytes(head) + b"Linux version 6.1.0-50-arm64 (debian-kernel@lists.debian.org) (gcc)"


def zimage() -> bytes:
    head = bytearray(0x40)
    struct.pack_into("<I", head, 0x24, 0x016F2818)
    return bytes(head)


@pytest.mark.parametrize(
    ("data", "arch"),
    [
        (bzimage(), "x86_64"),
        (bzimage(xloadflags=0), "i386"),
        (arm64_image(), "aarch64"),
        (gzip.compress(arm64_image()), "aarch64"),
        (zimage(), "arm"),
        (b"\x7fELF\x02\x01\x01" + bytes(9) + struct.pack("<HH", 2, 183), "aarch64"),
        (b"CONFIG_X=y\n" * 100, None),
        (b"", None),
    ],
)
def test_detect_arch(tmp_path: Path, data: bytes, arch: str | None) -> None:
    f = tmp_path / "k"
    f.write_bytes(data)
    assert kernel.detect_arch(f) == arch


def test_kernel_release(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("QLAUNCH_CACHE", str(tmp_path / "cache"))
    (tmp_path / "bz").write_bytes(bzimage())
    (tmp_path / "img").write_bytes(arm64_image())
    assert kernel.kernel_release(tmp_path / "bz") == "6.9.0-test"
    assert kernel.kernel_release(tmp_path / "img") == "6.1.0-50-arm64"
    # Remembered per file (identity), so the next exec need not read the image again.
    assert len(list((tmp_path / "cache" / "kernel-release").iterdir())) == 1
    (tmp_path / "gz").write_bytes(gzip.compress(b"no banner here"))
    assert kernel.kernel_release(tmp_path / "gz") is None
    assert kernel.kernel_release(tmp_path / "gz") is None


def test_find_modules_dir_takes_the_usual_shapes(tmp_path: Path) -> None:
    for v in ("6.1.0-1", "6.1.0-2"):
        (tmp_path / "lib" / "modules" / v / "kernel").mkdir(parents=True)
    want = (tmp_path / "lib" / "modules" / "6.1.0-2").resolve()
    assert kernel.find_modules_dir(tmp_path, "6.1.0-2") == want
    assert kernel.find_modules_dir(tmp_path / "lib" / "modules", "6.1.0-2") == want
    assert kernel.find_modules_dir(want, None) == want
    with pytest.raises(UsageError, match="no modules for kernel 6.9"):
        kernel.find_modules_dir(tmp_path, "6.9")
    with pytest.raises(UsageError, match="several kernels"):
        kernel.find_modules_dir(tmp_path, None)
    with pytest.raises(UsageError, match="no kernel modules found"):
        kernel.find_modules_dir(tmp_path / "lib" / "modules" / "6.1.0-1" / "kernel", None)


def test_find_config_in_a_build_tree_and_ikconfig(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("QLAUNCH_CACHE", str(tmp_path / "cache"))
    boot = tmp_path / "linux" / "arch" / "x86" / "boot"
    boot.mkdir(parents=True)
    (boot / "bzImage").write_bytes(bzimage())
    (tmp_path / "linux" / ".config").write_text("CONFIG_9P_FS=y\n")
    got = kernel.find_config(boot / "bzImage", None, None, tmp_path)
    assert got == tmp_path / "linux" / ".config"
    # An uncompressed image carrying its config (CONFIG_IKCONFIG).
    img = tmp_path / "Image"
    img.write_bytes(arm64_image() + b"IKCFG_ST" + gzip.compress(b"CONFIG_X=y\n") + b"IKCFG_ED")
    found = kernel.find_config(img, None, None, tmp_path)
    assert found is not None and found.read_text() == "CONFIG_X=y\n"


def test_parse_share(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    s = testloop.parse_share("d", cwd=tmp_path)
    assert (s.host, s.guest, s.readonly) == (tmp_path / "d", str(tmp_path / "d"), False)
    s = testloop.parse_share("d:/mnt/x:ro", cwd=tmp_path)
    assert (s.guest, s.readonly) == ("/mnt/x", True)
    assert testloop.parse_share("d:rw", cwd=tmp_path).guest == str(tmp_path / "d")
    for bad in ("nope", "d:relative", "d:/a b", "d:/x/../y", ":/x"):
        with pytest.raises(UsageError):
            testloop.parse_share(bad, cwd=tmp_path)


def test_matrix_file(tmp_path: Path) -> None:
    f = tmp_path / "m.toml"
    f.write_text(
        'timeout = 60\ncmd = ["uname", "-m"]\n'
        '[[run]]\nprofile = "default"\n'
        '[[run]]\nprofile = "default"\nmemory = "512M"\n'
        '[[run]]\nname = "arm 64"\nprofile = "aarch64-virt"\ntimeout = 90\n'
    )
    specs = matrix.load_matrix(str(f), testloop.ExecSpec(cmd=("true",)))
    assert [s.cmd for s in specs] == [("uname", "-m")] * 3
    assert [s.timeout for s in specs] == [60.0, 60.0, 90.0]
    names = [s.name for s in matrix.unique_names(specs)]
    assert names == ["default", "default-2", "arm-64"]
    f.write_text('[[run]]\nprofile = "default"\ncpu = 2\n')
    with pytest.raises(UsageError, match="unknown key 'cpu'"):
        matrix.load_matrix(str(f), testloop.ExecSpec(cmd=("true",)))
    f.write_text('[[run]]\ntimeout = "soon"\n')
    with pytest.raises(UsageError, match="timeout must be"):
        matrix.load_matrix(str(f), testloop.ExecSpec(cmd=("true",)))


def result(name: str, code: int, verdict: str = "exit", **kw: object) -> testloop.Result:
    base: dict[str, object] = {
        "name": name,
        "code": code,
        "stdout": "",
        "stderr": "",
        "console": "",
        "verdict": verdict,
        "message": "",
        "profile": "default",
        "duration": 1.5,
    }
    base.update(kw)
    return testloop.Result(**base)  # type: ignore[arg-type]


def test_junit_and_json_reports(tmp_path: Path) -> None:
    results = [
        result("ok", 0, stdout="fine\x1b[0m\n"),
        result(
            "boom",
            121,
            "panic",
            message="kernel panic on the console: exit 121",
            excerpt=["Kernel panic - not syncing: x"],
        ),
        result("bad", 3),
        result("broken", 2, "error", message="no profile named 'x'"),
    ]
    matrix.write_junit(str(tmp_path / "j.xml"), results)
    root = ET.parse(tmp_path / "j.xml").getroot()
    suite = root.find("testsuite")
    assert suite is not None
    assert (suite.get("tests"), suite.get("failures"), suite.get("errors")) == ("4", "2", "1")
    cases = {c.get("name"): c for c in suite.iter("testcase")}
    assert cases["ok"].find("failure") is None
    assert cases["ok"].findtext("system-out") == "fine\ufffd[0m\n"
    boom = cases["boom"].find("failure")
    assert boom is not None and boom.get("type") == "panic"
    assert "Kernel panic - not syncing: x" in (boom.text or "")
    bad = cases["bad"].find("failure")
    assert bad is not None and bad.get("message") == "exit status 3"
    assert cases["broken"].find("error") is not None
    matrix.write_json(str(tmp_path / "j.json"), results)
    doc = json.loads((tmp_path / "j.json").read_text())
    assert doc["ok"] is False
    assert [r["code"] for r in doc["runs"]] == [0, 121, 3, 2]


def test_exec_parser_alone_parses_as_the_whole_one() -> None:
    # `qlaunch exec` builds only its own parser (the kernel loop pays for qlaunch's start at
    # every run): what it parses must be what the whole parser parses.
    import subprocess
    import sys

    from qlaunch.cli import app

    lines = [
        ["exec", "--kernel", "asset:x86_64", "--share", ".", "--share-type", "9p", "--cpus", "2"],
        ["exec", "--profile", "a", "--profile", "b", "--junit", "o.xml", "--set", "machine.smp=2"],
        ["matrix", "collect", "12"],
    ]
    for line in lines:
        whole = vars(app.build_parser().parse_args(line))
        alone = vars(app.build_parser(only=line[0]).parse_args(line))
        assert {k: v for k, v in alone.items() if k != "func"} == {
            k: v for k, v in whole.items() if k != "func"
        }
    code = (
        "import sys; from qlaunch.cli.app import build_parser; build_parser(only='exec'); "
        "print(sorted(m for m in sys.modules if m.startswith('qlaunch.cli.commands.')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "qlaunch.cli.commands.vm" not in out.stdout and "commands.exec" in out.stdout
