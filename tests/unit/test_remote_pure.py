"""The pure parts of remote hosts: URIs, the global options, the remote shell's command string
(run here by sh and dash, as a remote login shell would), profiles sent along, and errors read
back from a remote qlaunch's stderr."""

from __future__ import annotations

import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest

from qlaunch.cli.commands import remote
from qlaunch.errors import HostError, QlaunchError, StateError, UsageError
from qlaunch.remote import uri
from qlaunch.remote.host import error_from
from qlaunch.remote.transport import NO_QLAUNCH, Connection, FileArg


def test_uris() -> None:
    t = uri.parse("ssh://admin@web1.example:2222?command=/opt/ql/bin/qlaunch&keyfile=/k")
    assert (t.user, t.host, t.port, t.command, t.keyfile) == (
        "admin",
        "web1.example",
        2222,
        "/opt/ql/bin/qlaunch",
        "/k",
    )
    assert t.where == "admin@web1.example:2222"
    assert uri.parse(t.uri()) == t
    assert uri.parse("ssh://[fd00::5]/").where == "[fd00::5]"
    assert uri.parse("ssh://h").command == "qlaunch" and uri.parse("ssh://h").user is None
    assert uri.parse("ssh://a@h").key() != uri.parse("ssh://b@h").key()
    for bad in (
        "http://h",
        "ssh://",
        "ssh://h/path",
        "ssh://h?nope=1",
        "ssh://h?command=",
        "ssh://u:pw@h",
        "ssh://h:0",
        "ssh://h:99999",
        "ssh://-oProxyCommand=x",
        "ssh://-x@h",
    ):
        with pytest.raises(UsageError):
            uri.parse(bad)


def test_global_options_are_read_before_the_command_word() -> None:
    assert remote.split(["--connect", "ssh://h", "list", "--json"]) == (
        "ssh://h",
        [],
        ["list", "--json"],
    )
    assert remote.split(["--debug", "--connect=ssh://h", "--local-profile", "p.toml", "start"]) == (
        "ssh://h",
        ["p.toml"],
        ["--debug", "start"],
    )
    # After the command word they are the command's (and a guest's after --).
    assert remote.split(["qmp", "web", "x", "--connect"]) == (
        None,
        [],
        ["qmp", "web", "x", "--connect"],
    )
    assert remote.split(["--", "--connect", "x"])[0] is None
    with pytest.raises(UsageError):
        remote.split(["--connect"])


def test_no_connect_is_here(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("QLAUNCH_CONNECT", raising=False)
    assert remote.wanted(None) is None
    monkeypatch.setenv("QLAUNCH_CONNECT", "ssh://h")
    assert remote.wanted(None) == "ssh://h"
    assert remote.wanted("") is None  # --connect '' overrides the environment: here


@pytest.mark.parametrize("shell", ["sh", "dash", "bash"])
def test_remote_command_string_quotes_every_word(shell: str, tmp_path: Path) -> None:
    if shutil.which(shell) is None:
        pytest.skip(f"no {shell}")
    fake = tmp_path / "fake qlaunch"
    fake.write_text('#!/bin/sh\nfor a in "$@"; do printf "<%s>\\n" "$a"; done\n')
    fake.chmod(0o755)
    conn = Connection(uri.parse(f"ssh://h?command={fake}"), base=tmp_path)
    words = ["qmp", "w'e b", "$(touch pwned)", "a;b", "", "-- x", "\n"]
    out = subprocess.run([shell, "-c", conn.command(words)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout == "".join(f"<{w}>\n" for w in words)
    assert not (tmp_path / "pwned").exists()
    # Files sent along become paths in a directory that is gone afterwards.
    text = "[machine]\nmemory = \"1G\" # it's '$HOME'\n"
    cat = tmp_path / "cat"
    cat.write_text('#!/bin/sh\ncat "$2"; echo "$2" > "$1"\n')
    cat.chmod(0o755)
    conn = Connection(uri.parse(f"ssh://h?command={cat}"), base=tmp_path)
    seen = tmp_path / "seen"
    out = subprocess.run(
        [shell, "-c", conn.command([str(seen), FileArg("web.toml", text)])],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0 and out.stdout == text, out.stderr
    used = Path(seen.read_text().strip())
    assert used.name == "web.toml" and not used.parent.exists()


def test_remote_without_qlaunch_is_one_line_and_exit_3(tmp_path: Path) -> None:
    for command, says in (("/nonexistent/qlaunch", "is not an executable there"),
                          ("no-such-qlaunch", "is not on its PATH")):  # fmt: skip
        conn = Connection(uri.parse(f"ssh://me@h?command={command}"), base=tmp_path)
        out = subprocess.run(["sh", "-c", conn.command(["list"])], capture_output=True, text=True)
        assert out.returncode == NO_QLAUNCH == 3
        lines = out.stderr.splitlines()
        assert len(lines) == 1 and lines[0].startswith("qlaunch: error: me@h has no qlaunch")
        assert says in lines[0] and "(hint: " in lines[0]


def test_profiles_sent_along_read_back_as_the_same_table() -> None:
    data = {
        "description": 'quotes " and \\ and\nnewlines',
        "machine": {"memory": "1G", "smp": 2, "tpm": True},
        "boot": {"append": "quiet", "modules": ["a", "b"]},
        "disk": [{"path": "/x y.qcow2", "readonly": False}, {"path": "z"}],
        "weird key": {"k.e.y": 1.5},
    }
    assert tomllib.loads(remote.to_toml(data)) == data


def test_errors_read_back_from_stderr() -> None:
    e = error_from(
        5, "qlaunch: note\nqlaunch: error: no VM named x (hint: qlaunch list shows the VMs)\n"
    )
    assert isinstance(e, StateError) and e.message == "no VM named x"
    assert e.hint == "qlaunch list shows the VMs"
    assert isinstance(error_from(3, "qlaunch: error: h has no qlaunch"), HostError)
    e = error_from(1, "something else")
    assert type(e) is QlaunchError and e.exit_code == 1
