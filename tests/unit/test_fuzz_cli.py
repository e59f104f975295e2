"""The error contract, fuzzed (issue 17): generated profiles (valid and broken TOML, every
settings key with wrong types and edge values, `extends` chains), --set arguments, VM and
network names, and command lines for every subcommand, run in-process through
qlaunch.cli.app.main. For each: the exit code is one README documents for that command, an error
is exactly one line on stderr, nothing raises (no traceback), and nothing new appears under the
state root.

Nothing boots: the points where run, start and exec would start QEMU raise WouldBoot instead,
so those commands are fuzzed up to their last check. Commands that change the host (`net
create`/`start`/`gc`, `assets fetch`) are left out.

QLAUNCH_FUZZ_EXAMPLES sets the number of examples per test (default: a few seconds' worth).
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import shutil
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import exitdoc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qlaunch.cli import app
from qlaunch.config.settings import ARRAY_SECTIONS, SECTIONS, Setting

EXAMPLES = int(os.environ.get("QLAUNCH_FUZZ_EXAMPLES", "40"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,
    suppress_health_check=[
        HealthCheck.function_scoped_fixture,
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
    ],
)
HANG = 30  # seconds one command may take before it counts as hung


class WouldBoot(BaseException):
    """Raised where a command would start QEMU: it got past every check."""


class Hung(BaseException):
    pass


# ---- the world each example runs in ------------------------------------------------------------


class World:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.state = root / "state"
        self.config = root / "config"
        self.cache = root / "cache"
        self.work = root / "work"
        self.qcow2 = b""

    def reset(self) -> None:
        """Fresh work files, generated profiles cleared, the two fake VMs in place."""
        shutil.rmtree(self.work, ignore_errors=True)
        shutil.rmtree(self.config / "profiles", ignore_errors=True)
        (self.config / "profiles").mkdir(parents=True)
        w = self.work
        w.mkdir()
        (w / "dir").mkdir()
        os.mkfifo(w / "fifo")
        (w / "img.qcow2").write_bytes(self.qcow2)
        with open(w / "raw.img", "wb") as f:
            f.truncate(1 << 20)
        (w / "text").write_text("some text of the user's\n")
        (w / "ud").write_text("#cloud-config\n")
        (w / "latin1.toml").write_bytes(b"description = 'caf\xe9'\n")
        (w / "saved.qlsave").write_bytes(b"QLSAVE\x00\x01not really")
        # As in any state root that has been used: the lock directory is there.
        (self.state / ".locks").mkdir(exist_ok=True)
        self._fake_vm("vm1", {})
        # A saved VM: its disk and save file are held until `rm`.
        self._fake_vm(
            "vm2",
            {"saved": {"file": str(w / "saved.qlsave"), "at": 0}},
            argv=["qemu-system-x86_64", "-drive", f"file.filename={w / 'raw.img'},format=raw"],
        )

    def _fake_vm(self, name: str, extra: dict[str, Any], argv: list[str] | None = None) -> None:
        d = self.state / name
        if (d / "state.json").exists():
            return
        d.mkdir(parents=True, exist_ok=True)
        rec = {
            "name": name,
            "uuid": "00000000-0000-0000-0000-000000000000",
            "profile": "default",
            "state": "stopped",
            "extra": extra,
        }
        (d / "state.json").write_text(json.dumps(rec))
        (d / "argv.json").write_text(json.dumps(argv or ["qemu-system-x86_64"]))
        (d / "profile.json").write_text(json.dumps({"name": "default", "profile": {}}))

    def tree(self) -> set[str]:
        out = set()
        for dirpath, dirnames, filenames in os.walk(self.state):
            for n in dirnames + filenames:
                out.add(os.path.relpath(os.path.join(dirpath, n), self.state))
        return out


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    w = World(tmp_path_factory.mktemp("fuzz"))
    template = w.root / "template.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(template), "1M"], check=True)
    w.qcow2 = template.read_bytes()
    w.state.mkdir()
    from qlaunch.launch import run as runmod
    from qlaunch.testloop import driver
    from qlaunch.vm import api

    def would_boot(*a: object, **k: object) -> Any:
        raise WouldBoot

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("QLAUNCH_STATE", str(w.state))
        mp.setenv("QLAUNCH_CONFIG", str(w.config))
        mp.setenv("QLAUNCH_CACHE", str(w.cache))
        mp.delenv("QLAUNCH_NETNS", raising=False)
        mp.setattr(driver, "execute", would_boot)
        mp.setattr(runmod, "run", would_boot)
        mp.setattr(api, "SupervisorHandle", would_boot)
        mp.setattr(api, "_build_and_run", would_boot)
        w.reset()
        mp.chdir(w.work)
        yield w


@contextlib.contextmanager
def deadline(seconds: int) -> Iterator[None]:
    def hung(signum: int, frame: object) -> None:
        raise Hung

    old = signal.signal(signal.SIGALRM, hung)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def run(world: World, argv: list[str]) -> None:
    """Run qlaunch ARGV and hold it to the contract."""
    world.reset()
    os.chdir(world.work)
    before = world.tree()
    out = io.TextIOWrapper(io.BytesIO(), encoding="utf-8", errors="replace")
    err = io.TextIOWrapper(io.BytesIO(), encoding="utf-8", errors="replace")
    booted = False
    code: int | None = None
    with deadline(HANG), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = app.main(list(argv))
        except WouldBoot:
            booted = True
        except Hung:
            raise AssertionError(f"qlaunch {argv} hung for {HANG} s") from None
    err.flush()
    err.seek(0)
    text = err.buffer.getvalue().decode(errors="replace")  # type: ignore[attr-defined]
    # The root's own vm.log records what was done (`rm` of a VM), not something half-made.
    new = world.tree() - before - {"vm.log"}
    if booted:
        new -= {"exec-logs"}  # exec makes its log directory just before it would boot
    assert not new, f"qlaunch {argv} left {sorted(new)} under the state root"
    assert "Traceback" not in text, f"qlaunch {argv}:\n{text}"
    if booted:
        return
    assert isinstance(code, int)
    word = app.command_word(argv[: argv.index("--")] if "--" in argv else argv)
    try:
        allowed = exitdoc.codes_for(word or "")
    except KeyError:
        allowed = {0, 2}  # no such command (or none): argparse's usage error, or --help
    allowed |= {0} if "--help" in argv or "-h" in argv else set()
    assert code in allowed, f"qlaunch {argv} -> {code}, README documents {sorted(allowed)}\n{text}"
    if 2 <= code <= 5:
        lines = [ln for ln in text.splitlines() if ln.strip()]
        assert len(lines) == 1, f"qlaunch {argv} -> {code}, stderr:\n{text}"
        assert lines[0].startswith("qlaunch: error: "), f"qlaunch {argv}:\n{text}"


# ---- values ------------------------------------------------------------------------------------

ODD_TEXT = st.text(
    alphabet=st.characters(blacklist_categories=("Cs",), max_codepoint=0x2FF), max_size=12
)
EDGE_INTS = st.sampled_from([0, 1, -1, 2, 4, 5, 64, 255, 256, 1024, 2**31, 2**63 - 1, -(2**63)])
EDGE_STRS = st.sampled_from(
    [
        "",
        " ",
        "0",
        "1G",
        "512",
        "512M",
        "1.5G",
        "-1M",
        "12X",
        "9E",
        "x" * 300,
        "a,b",
        "\n",
        "\x00",
        "caf\u00e9",
        "qlaunch",
        "asset:x86_64/kernel",
        "asset:../x",
        "asset:",
        "/nonexistent",
        "dir",
        "fifo",
        "text",
        "img.qcow2",
        "raw.img",
        "tcp:127.0.0.1:2222-:22",
        "udp::53-:53",
        "52:54:00:12:34:56",
        "01:00:5e:00:00:01",
        "10.0.0.1",
        "q35",
        "virt",
        "raspi3b",
        "vexpress-a9",
        "ttyS0",
        "ssh-ed25519 AAAAC3Nza k@h",
        "not a key",
        "default",
    ]
)
SCALARS = st.one_of(EDGE_INTS, EDGE_STRS, ODD_TEXT, st.booleans(), st.floats(allow_nan=True))
JUNK = st.recursive(
    SCALARS,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.dictionaries(st.sampled_from(["a", "path"]), inner)
    ),
    max_leaves=4,
)


def good_value(s: Setting) -> st.SearchStrategy[Any]:
    if s.choices:
        return st.sampled_from(list(s.choices))
    if s.type is bool:
        return st.booleans()
    if s.type is int:
        return EDGE_INTS
    if s.type is list:
        items = EDGE_INTS if s.item_type is int else EDGE_STRS
        return st.lists(items, max_size=3)
    return EDGE_STRS


def setting_value(s: Setting) -> st.SearchStrategy[Any]:
    """Mostly of the right type (edge values), sometimes any other."""
    return st.one_of(good_value(s), good_value(s), JUNK)


def toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)  # a TOML basic string, escapes included
    if isinstance(v, list):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{json.dumps(k)} = {toml_value(x)}" for k, x in v.items()) + "}"
    raise TypeError(v)


@st.composite
def table(draw: st.DrawFn, section: str) -> dict[str, Any]:
    keys = draw(st.lists(st.sampled_from(sorted(SECTIONS[section])), max_size=4, unique=True))
    out = {k: draw(setting_value(SECTIONS[section][k])) for k in keys}
    if draw(st.integers(0, 9)) == 0:
        out[draw(st.sampled_from(["memroy", "x", "path "]))] = draw(SCALARS)
    return out


PROFILE_NAMES = ["p0", "p1", "p2"]


@st.composite
def profile_text(draw: st.DrawFn) -> bytes:
    kind = draw(st.integers(0, 9))
    if kind == 0:
        return draw(st.binary(max_size=40))
    if kind == 1:
        return draw(ODD_TEXT).encode("utf-8", "surrogatepass")
    lines: list[str] = []
    if draw(st.booleans()):
        parent = draw(
            st.one_of(
                st.sampled_from([*PROFILE_NAMES, "default", "aarch64-virt", "nosuch", "../x"]),
                JUNK,
            )
        )
        lines.append(f"extends = {toml_value(parent)}")
    if draw(st.booleans()):
        lines.append(f"description = {toml_value(draw(SCALARS))}")
    for section in draw(st.lists(st.sampled_from(sorted(SECTIONS)), max_size=4, unique=True)):
        if section in ARRAY_SECTIONS:
            for _ in range(draw(st.integers(0, 2))):
                lines.append(f"[[{section}]]")
                lines += [
                    f"{json.dumps(k)} = {toml_value(v)}" for k, v in draw(table(section)).items()
                ]
        else:
            lines.append(f"[{json.dumps(section)}]")
            lines += [f"{json.dumps(k)} = {toml_value(v)}" for k, v in draw(table(section)).items()]
    if kind == 2:
        lines.append(
            draw(st.sampled_from(["[machine", "machine = 3", "[[machine]]", "disk = 'x'"]))
        )
    text = "\n".join(lines) + "\n"
    if kind == 3:
        text = text[: draw(st.integers(0, len(text)))]
    return text.encode("utf-8", "surrogatepass")


SET_KEYS = [f"{sec}.{k}" for sec in SECTIONS if sec not in ARRAY_SECTIONS for k in SECTIONS[sec]]
SET_KEYS += [f"{sec}.{n}.{k}" for sec in ARRAY_SECTIONS for n in (0, 1, 3) for k in SECTIONS[sec]]
SET_JUNK_KEYS = ["machine", "machine.", ".x", "disk.x.path", "disk.-1.path", "a.b.c.d", "", "x.y"]


@st.composite
def set_arg(draw: st.DrawFn) -> str:
    key = draw(st.one_of(st.sampled_from(SET_KEYS), st.sampled_from(SET_JUNK_KEYS)))
    setting = None
    parts = key.split(".")
    if len(parts) in (2, 3) and parts[0] in SECTIONS and parts[-1] in SECTIONS[parts[0]]:
        setting = SECTIONS[parts[0]][parts[-1]]
    value = draw(setting_value(setting)) if setting is not None else draw(JUNK)
    text = draw(st.one_of(st.just(toml_value(value)), st.just(str(value)), ODD_TEXT))
    return key if draw(st.integers(0, 19)) == 0 else f"{key}={text}"


def sets() -> st.SearchStrategy[list[str]]:
    return st.lists(set_arg(), max_size=3).map(lambda xs: [a for x in xs for a in ("--set", x)])


# ---- command lines -----------------------------------------------------------------------------

VM_NAMES = st.one_of(
    st.sampled_from(
        ["vm1", "vm2", "web", "-x", "--x", "-", "exec-logs", "a" * 65, "", " ", "vm1 ", "a/b", ".."]
    ),
    ODD_TEXT,
)
NET_NAMES = st.one_of(st.sampled_from(["lab", "-lab", "a" * 40, "", "@host", "lab0"]), ODD_TEXT)


def paths(world_state: str) -> st.SearchStrategy[str]:
    return st.one_of(
        st.sampled_from(
            [
                "img.qcow2",
                "raw.img",
                "text",
                "ud",
                "dir",
                "dir/",
                "fifo",
                "missing.qcow2",
                "new.iso",
                "new.img",
                "out.json",
                "saved.qlsave",
                "latin1.toml",
                ".",
                "",
                "/nonexistent/x",
                "text/x",
                f"{world_state}/vm1/state.json",
                f"{world_state}/vm1/new.img",
                f"{world_state}/.locks/new.lock",
                f"{world_state}/vm2/argv.json",
            ]
        ),
        ODD_TEXT.map(lambda t: t.replace("/", "_").replace("\x00", "") or "f"),
    )


NUMBERS = st.one_of(
    st.sampled_from(["0", "-1", "1", "0.001", "nan", "inf", "-inf", "1e309", "abc", "", "5"]),
    ODD_TEXT,
)
SIZES = st.one_of(
    st.sampled_from(["0", "1", "1G", "64M", "-1", "1.5K", "1.3K", "8E", "9E", "+1G", "+0", "x"]),
    ODD_TEXT,
)
SIGNALS = st.one_of(
    st.sampled_from(["KILL", "9", "999", "0", "SIGTERM", "term", "-1", "64", "65", "", "\u0663"]),
    ODD_TEXT,
)
EXTRA = st.lists(
    st.sampled_from(["--json", "--force", "-f", "--help", "--", "-x", "extra"]), max_size=2
)


def opt(flag: str, value: st.SearchStrategy[str]) -> st.SearchStrategy[list[str]]:
    return st.one_of(st.just([]), value.map(lambda v: [flag, v]))


def flag(name: str) -> st.SearchStrategy[list[str]]:
    return st.sampled_from([[], [name]])


def cat(*parts: st.SearchStrategy[Any]) -> st.SearchStrategy[list[str]]:
    def join(xs: tuple[Any, ...]) -> list[str]:
        out: list[str] = []
        for x in xs:
            out += x if isinstance(x, list) else [x]
        return out

    return st.tuples(*parts).map(join)


def command_lines(state_dir: str) -> st.SearchStrategy[list[str]]:
    P = paths(state_dir)
    N = VM_NAMES
    lit = st.just
    profile_ref = st.sampled_from(["default", "nosuch", "dir", "fifo", "text", "latin1.toml"])
    return st.one_of(
        cat(lit("cmdline"), profile_ref, sets(), flag("--json")),
        cat(lit("profiles"), flag("--json")),
        cat(lit("boards"), flag("--json")),
        cat(st.sampled_from(["list", "ls"]), flag("--json")),
        cat(lit("status"), N, flag("--json")),
        cat(lit("stop"), N, opt("--timeout", NUMBERS), flag("--force"), flag("--json")),
        cat(lit("rm"), st.lists(N, min_size=0, max_size=2), flag("--force")),
        cat(lit("kill"), N, opt("--signal", SIGNALS)),
        cat(
            lit("qmp"),
            N,
            ODD_TEXT,
            st.one_of(lit([]), ODD_TEXT.map(lambda t: [t])),
            opt("--timeout", NUMBERS),
        ),
        cat(lit("events"), N, flag("--json")),
        cat(st.sampled_from(["pause", "resume"]), N),
        cat(lit("console"), N, opt("--linger", NUMBERS)),
        cat(lit("log"), N, st.sampled_from([[], ["--qemu"], ["--lifecycle"]])),
        cat(lit("save"), N, P, flag("--force"), flag("--json")),
        cat(lit("restore"), P, opt("--name", N)),
        cat(
            lit("snapshot"),
            N,
            st.sampled_from(["create", "list", "revert", "delete", "x"]),
            st.one_of(lit([]), ODD_TEXT.map(lambda t: [t])),
        ),
        cat(
            lit("attach-disk"),
            N,
            P,
            opt("--format", st.sampled_from(["raw", "qcow2", "x"])),
            flag("--readonly"),
        ),
        cat(st.sampled_from(["detach-disk", "detach-nic"]), N, ODD_TEXT, opt("--timeout", NUMBERS)),
        cat(
            lit("attach-nic"),
            N,
            opt("--mode", st.sampled_from(["user", "tap"])),
            opt("--mac", EDGE_STRS),
        ),
        cat(
            lit("image"),
            lit("create"),
            P,
            st.one_of(lit([]), SIZES.map(lambda s: [s])),
            opt("--format", st.sampled_from(["qcow2", "raw", "vdi", "x"])),
            opt("--backing", P),
        ),
        cat(lit("image"), st.sampled_from(["info", "check", "sd-round"]), P, flag("--json")),
        cat(
            lit("image"),
            lit("convert"),
            P,
            P,
            lit("--format"),
            st.sampled_from(["qcow2", "raw", "x"]),
        ),
        cat(lit("image"), lit("resize"), P, SIZES, flag("--shrink")),
        cat(lit("image"), lit("overlay"), P, P),
        cat(
            lit("seed"),
            P,
            lit("--user-data"),
            P,
            opt("--meta-data", P),
            opt("--network-config", P),
            opt("--hostname", EDGE_STRS),
            opt("--ssh-key", EDGE_STRS),
            flag("--force"),
        ),
        cat(lit("net"), st.sampled_from(["list", "show", "delete", "stop"]), NET_NAMES),
        cat(lit("assets"), lit("list"), flag("--json")),
        cat(
            lit("start"),
            profile_ref,
            opt("--name", N),
            sets(),
            opt("--restart", st.sampled_from(["no", "always", "x"])),
            opt("--netns", NET_NAMES),
        ),
        cat(lit("run"), profile_ref, sets(), st.sampled_from([[], ["--", "true"]])),
        cat(
            lit("exec"),
            opt("--profile", profile_ref),
            opt("--kernel", P),
            opt("--matrix", P),
            opt("--cpus", NUMBERS),
            opt("--timeout", NUMBERS),
            opt("--console-log", P),
            opt("--junit", P),
            opt("--json", P),
            flag("--force"),
            st.sampled_from([[], ["--", "true"]]),
        ),
        st.lists(st.one_of(ODD_TEXT, st.sampled_from(["--", "-h", "--version"])), max_size=3),
    ).flatmap(lambda argv: EXTRA.map(lambda extra: _insert(argv, extra)))


def _insert(argv: list[str], extra: list[str]) -> list[str]:
    # Extra words go before any `--` of a guest command, where an option would be.
    if "--" in argv:
        i = argv.index("--")
        return argv[:i] + extra + argv[i:]
    return argv + extra


@FUZZ
@given(data=st.data())
def test_command_lines(world: World, data: st.DataObject) -> None:
    argv = data.draw(command_lines(str(world.state)), label="argv")
    run(world, argv)


@FUZZ
@given(
    files=st.lists(profile_text(), min_size=1, max_size=3),
    which=st.sampled_from(PROFILE_NAMES),
    by_path=st.booleans(),
    extra=sets(),
    command=st.sampled_from(["cmdline", "run", "start", "exec", "profiles"]),
)
def test_profiles(
    world: World, files: list[bytes], which: str, by_path: bool, extra: list[str], command: str
) -> None:
    def argv() -> list[str]:
        ref = str(world.config / "profiles" / f"{which}.toml") if by_path else which
        if command == "profiles":
            return ["profiles"]
        if command == "exec":
            return ["exec", "--profile", ref, *extra, "--", "true"]
        return [command, ref, *extra]

    # Written after run() resets the world: the profiles go into its fresh config directory.
    real_reset = world.reset

    def reset_then_write() -> None:
        real_reset()
        for name, body in zip(PROFILE_NAMES, files, strict=False):
            (world.config / "profiles" / f"{name}.toml").write_bytes(body)

    world.reset = reset_then_write  # type: ignore[method-assign]
    try:
        run(world, argv())
    finally:
        world.reset = real_reset  # type: ignore[method-assign]
