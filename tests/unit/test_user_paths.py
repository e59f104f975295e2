"""What a new user meets first: the README's commands, the help texts' examples, and the
mistakes people make on the command line. No QEMU here: see
tests/integration/test_user_paths_boot.py.
"""

from __future__ import annotations

import re
import shlex
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from qlaunch.cli import app as cli
from qlaunch.config import profile
from qlaunch.errors import UsageError
from qlaunch.launch.host import HostFacts, Verdict

REPO = Path(__file__).resolve().parents[2]
README = (REPO / "README.md").read_text()
DOCS = [README, *(p.read_text() for p in sorted((REPO / "docs").glob("*.md")))]
# Profiles the README itself defines (e.g. ~/.config/qlaunch/profiles/web.toml), not shipped.
README_DEFINED = set(re.findall(r"profiles/([\w-]+)\.toml", "".join(DOCS)))
SEPARATORS = {";", "&&", "||", "|", "&"}


def _code_blocks(text: str) -> Iterator[str]:
    """The shell blocks (``` or ```sh) of a Markdown text, synopsis brackets ([--json]) removed."""
    lang: str | None = None
    body: list[str] = []
    for line in text.splitlines():
        if line.startswith("```"):
            if lang is None:
                lang, body = line[3:].strip(), []
                continue
            if lang in ("", "sh", "bash"):
                yield re.sub(r" \[[^\]]*\]", "", "\n".join(body))
            lang = None
        elif lang is not None:
            body.append(line)


def _commands(script: str) -> Iterator[list[str]]:
    """Each `qlaunch ...` invocation in a shell snippet, as argv after `qlaunch`."""
    for line in script.splitlines():
        if line.rstrip().endswith("\\"):
            continue  # a continued line: not a README pattern for qlaunch commands
        lex = shlex.shlex(line, posix=True, punctuation_chars=";&|")
        lex.whitespace_split = True
        lex.commenters = "#"
        try:
            tokens = list(lex)
        except ValueError:
            continue  # an unbalanced quote spanning lines: a multi-line sh -c script
        cmd: list[str] = []
        for tok in [*tokens, ";"]:
            if tok in SEPARATORS:
                while cmd and re.fullmatch(r"[A-Z_]+=\S*", cmd[0]):
                    cmd.pop(0)  # QLAUNCH_NETNS=x qlaunch ...
                if cmd and cmd[0] == "qlaunch":
                    yield cmd[1:]
                cmd = []
            else:
                cmd.append(tok)


def _help_examples() -> Iterator[str]:
    """The `examples:` lines of qlaunch --help and of each subcommand's --help."""
    texts = [cli.EXAMPLES]
    for name in cli.COMMAND_MODULES:
        texts.append(getattr(name, "EXAMPLES", ""))
    for text in texts:
        for line in text.splitlines():
            # The command, without the explanation that follows it after two spaces.
            yield re.split(r"\s{2,}", line.strip())[0]


def _parse(argv: list[str]) -> object:
    # The guest's command split off as qlaunch itself does it: only for the commands that take
    # one (a README line that gives one to another command must fail here).
    own, _ = cli.split_guest_cmd(argv)
    parser = cli.build_parser()
    try:
        return parser.parse_args(own)
    except SystemExit:
        raise AssertionError(f"`qlaunch {shlex.join(argv)}` does not parse") from None


README_COMMANDS = [c for doc in DOCS for block in _code_blocks(doc) for c in _commands(block)]
HELP_COMMANDS = [c for line in _help_examples() for c in _commands(line)]


def test_the_readme_has_commands_to_check() -> None:
    # Guards the extraction itself: a README without ```sh blocks would pass everything below.
    assert len(README_COMMANDS) > 40
    assert len(HELP_COMMANDS) > 15


@pytest.mark.parametrize("argv", README_COMMANDS + HELP_COMMANDS, ids=shlex.join)
def test_documented_commands_parse(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    """Every qlaunch command line in the README and the help examples names a real
    subcommand with options it has."""
    _parse(argv)
    assert "error" not in capsys.readouterr().err


@pytest.mark.parametrize("argv", README_COMMANDS + HELP_COMMANDS, ids=shlex.join)
def test_documented_profiles_exist(argv: list[str]) -> None:
    args = _parse(argv)
    names = getattr(args, "profile", None) or []
    if args.command in ("run", "start", "cmdline") and isinstance(names, str):
        names = [names]
    for name in names if isinstance(names, list) else []:
        if name in README_DEFINED:
            continue
        profile.find(name)  # raises with the known names when there is no such profile


def test_shipped_list_is_every_profile() -> None:
    line = re.search(r"^Shipped: (.*?)\(", README, flags=re.M | re.S)
    assert line, "the README's Profiles section lists the shipped profiles"
    listed = set(re.findall(r"`([\w-]+)`", line.group(1)))
    shipped = {p.stem for p in (REPO / "profiles").glob("*.toml")}
    assert listed == shipped


# ---- mistakes on the command line: one line, exit 2, a hint, no traceback --------------------


def cli_run(*args: str) -> subprocess.CompletedProcess[str]:
    import sys

    exe = Path(sys.executable).parent / "qlaunch"
    return subprocess.run([str(exe), *args], capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize(
    ("args", "message", "hint"),
    [
        (
            ["run", "default", "--sett", "x"],
            "unrecognized arguments: --sett x",
            "qlaunch run --help",
        ),
        (
            ["net", "create", "lab", "--subnt", "1"],
            "unrecognized arguments: --subnt 1",
            "qlaunch net create --help",
        ),
        (["exec", "--kernel"], "argument --kernel: expected one argument", "qlaunch exec --help"),
        (["frobnicate"], "invalid choice: 'frobnicate'", "qlaunch --help"),
        (
            ["run", "default", "uname", "-a"],
            "unrecognized arguments: uname -a",
            "the guest's command goes after --: qlaunch run PROFILE -- uname -a",
        ),
        (["exec", "--timeout", "-5", "--", "true"], "--timeout: -5 must be more than 0", None),
        (["exec", "--cpus", "0", "--", "true"], "--cpus: 0 must be more than 0", None),
        (["exec", "--jobs", "x", "--", "true"], "--jobs: 'x' is not a number", None),
    ],
)
def test_argparse_mistakes_are_one_line(args: list[str], message: str, hint: str | None) -> None:
    r = cli_run(*args)
    assert r.returncode == 2
    assert r.stdout == ""
    assert r.stderr.count("\n") == 1, r.stderr  # no usage block
    assert r.stderr.startswith(f"qlaunch: error: {message}") or message in r.stderr, r.stderr
    assert r.stderr.startswith("qlaunch: error: ")
    if hint:
        assert f"(hint: {hint})" in r.stderr


def test_debug_works_after_the_subcommand(run_cli, tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[machine\n")
    code, _, err = run_cli("cmdline", str(bad), "--debug")
    assert code == 2
    assert "Traceback" in err
    assert err.rstrip().splitlines()[-1].startswith("qlaunch: error: ")


def test_set_errors_name_the_set_not_only_the_file(run_cli) -> None:
    code, out, err = run_cli("cmdline", "default", "--set", "machine.memroy=1G")
    assert code == 2 and out == ""
    assert err.startswith("qlaunch: error: --set machine.memroy=1G on ")
    assert "default.toml: [machine] unknown key 'memroy'" in err


def test_a_broken_file_is_still_blamed_with_a_set(run_cli, tmp_path: Path) -> None:
    bad = tmp_path / "p.toml"
    bad.write_text('[boot]\nkernel = "asset:x86_64/kernel"\n[machine]\nsmp = 0\n')
    code, _, err = run_cli("cmdline", str(bad), "--set", "machine.memory=1G")
    assert code == 2
    assert err.startswith(f"qlaunch: error: {bad}: [machine] smp: 0 must be 1 or more")


def test_sets_valid_only_together_still_load() -> None:
    p = profile.load("default", ["net.0.mode=network", "net.0.network=lab"])
    assert p.nets[0].network == "lab"


def test_exec_flags_are_named_when_bad() -> None:
    from qlaunch.testloop import driver as testloop

    spec = testloop.ExecSpec(cmd=("true",), memory="lots")
    with pytest.raises(UsageError) as e:
        testloop._load_profile(spec, None, "x86_64")
    assert e.value.message.startswith("--memory lots on ")


def test_foreign_guest_reason_is_the_architecture() -> None:
    # On a host whose /dev/kvm is unusable, an aarch64 guest is TCG for its arch, first of all.
    host = HostFacts(arch="x86_64", kvm=Verdict(False, "/dev/kvm is provided by kvm_pvm"))
    assert host.kvm_for("aarch64").reason == "KVM cannot run aarch64 guests on this x86_64 host"
    assert host.kvm_for("x86_64").reason == "/dev/kvm is provided by kvm_pvm"


def test_attach_disk_names_a_missing_file(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from qlaunch.vm import hotplug

    monkeypatch.setattr(hotplug, "_running", lambda name, base: object())
    missing = tmp_path / "data.qcow2"
    with pytest.raises(UsageError) as e:
        hotplug.attach_disk("web", str(missing))
    assert e.value.message == f"{missing} does not exist"
    assert e.value.hint == f"create it first: qlaunch image create {missing} 1G"
    assert not missing.exists()


def test_cmdline_shows_the_plan_of_a_run_with_a_command() -> None:
    # run -- CMD plans no hotplug ports (nothing plugs into a command's run), so cmdline must
    # take the command to show what that run runs.
    bare = cli_run("cmdline", "default")
    with_cmd = cli_run("cmdline", "default", "--", "true")
    assert bare.returncode == 0 and with_cmd.returncode == 0, (bare.stderr, with_cmd.stderr)
    assert "qlaunch-hp0" in bare.stdout and "qlaunch-hp0" not in with_cmd.stdout
    exec_plan = cli_run("cmdline", "default", "--for", "exec", "--", "uname", "-r")
    assert exec_plan.returncode == 0 and "qlaunch.exec=" in exec_plan.stdout, exec_plan.stderr
