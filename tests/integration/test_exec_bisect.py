"""`git bisect run` driving `qlaunch exec`: good, bad, and a kernel that does not boot (skip).

The "kernel" stays the same; what changes from commit to commit is the test script, and at one
commit a kernel command line that keeps the kernel from booting (init= names nothing), as a
broken build would. --boot-failure-exit 125 makes bisect skip that commit.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.boot

CHECK = """\
#!/bin/sh
# What a kernel developer's bisect script does after building: boot it and run the test.
exec "$QLAUNCH" exec --kernel asset:x86_64 --boot-failure-exit 125 --timeout 120 \\
    --append "$(cat append)" -- sh -c "$(cat test.sh)"
"""


def git(repo: Path, *args: str) -> str:
    env = dict(
        os.environ,
        GIT_AUTHOR_NAME="t",
        GIT_AUTHOR_EMAIL="t@example.invalid",
        GIT_COMMITTER_NAME="t",
        GIT_COMMITTER_EMAIL="t@example.invalid",
    )
    r = subprocess.run(
        ["git", "-C", str(repo), *args], env=env, capture_output=True, text=True, timeout=600
    )
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout


@pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")
def test_git_bisect_run_finds_the_first_bad_commit_and_skips_a_broken_boot(
    qlaunch_bin: list[str], tmp_path: Path
) -> None:
    repo = tmp_path / "repo"
    repo.mkdir()
    git(repo, "init", "-q", "-b", "main")
    (repo / "check.sh").write_text(CHECK)
    (repo / "check.sh").chmod(0o755)
    # c0..c4 good, c3 does not boot, c5 and c6 bad: with six commits to look at, bisect's
    # first pick is c3, and the answer stays c5 whichever neighbour it tries next.
    history = [
        ("", "exit 0"),
        ("", "exit 0"),
        ("", "exit 0"),
        ("rdinit=/nonexistent init=/nonexistent", "exit 0"),
        ("", "exit 0"),
        ("", "echo regression >&2; exit 1"),
        ("", "exit 1"),
    ]
    shas = []
    for i, (append, test) in enumerate(history):
        (repo / "append").write_text(append + "\n")
        (repo / "test.sh").write_text(f"echo commit {i}\n{test}\n")
        git(repo, "add", "-A")
        git(repo, "commit", "-q", "-m", f"c{i}")
        shas.append(git(repo, "rev-parse", "HEAD").strip())
    git(repo, "bisect", "start", shas[-1], shas[0])
    # The script finds qlaunch as $QLAUNCH: this venv's, however it is installed.
    wrapper = tmp_path / "qlaunch"
    wrapper.write_text(f'#!/bin/sh\nexec {shlex.join(qlaunch_bin)} "$@"\n')
    wrapper.chmod(0o755)
    env = dict(os.environ, QLAUNCH=str(wrapper), QLAUNCH_STATE=str(tmp_path / "state"))
    r = subprocess.run(
        ["git", "-C", str(repo), "bisect", "run", "./check.sh"],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"{shas[5]} is the first bad commit" in r.stdout
    log = git(repo, "bisect", "log")
    assert f"git bisect skip {shas[3]}" in log
    git(repo, "bisect", "reset")
