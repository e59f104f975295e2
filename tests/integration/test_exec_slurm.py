"""`qlaunch exec --matrix --on slurm` on a real one-node Slurm cluster: munged, slurmctld and
slurmd from Debian's packages, started by examples/slurm/one-node-cluster.sh in a temporary
directory for this module and stopped at its end.

The node has 2 CPUs and each run asks for one, as a local matrix runs 2 at once here: the JUnit
and JSON of the same matrix on both must be equal but for nodes, times and where the console
logs are.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from qlaunch.testloop import matrix

pytestmark = pytest.mark.boot

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "examples" / "slurm" / "one-node-cluster.sh"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A running one-node cluster; SLURM_CONF points at it for the module's tests."""
    if os.geteuid() != 0:
        pytest.skip("slurmd and munged need root")
    d = tmp_path_factory.mktemp("slurm")
    env = dict(
        os.environ,
        CPUS="2",
        SLURMCTLD_PORT=str(_free_port()),
        SLURMD_PORT=str(_free_port()),
    )
    r = subprocess.run(
        [str(SCRIPT), "start", str(d)], env=env, capture_output=True, text=True, timeout=120
    )
    try:
        assert r.returncode == 0, r.stderr
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("SLURM_CONF", str(d / "slurm.conf"))
            yield d
    finally:
        subprocess.run([str(SCRIPT), "stop", str(d)], timeout=120, check=False)
    assert not (d / "munge.dir").exists()


def _squeue(job: str = "") -> str:
    argv = ["squeue", "--noheader", "--array", "--format=%i %T %R"]
    argv += [f"--jobs={job}"] if job else []
    return subprocess.run(argv, capture_output=True, text=True, timeout=60).stdout


def _eventually(check: Callable[[], bool], within: float = 30) -> bool:
    deadline = time.monotonic() + within
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)
    return True


def _env(tmp_path: Path) -> dict[str, str]:
    return dict(os.environ, QLAUNCH_STATE=str(tmp_path / "state"))


def _qlaunch(
    qlaunch_bin: list[str], args: list[str], cwd: Path, env: dict[str, str], timeout: float = 600
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*qlaunch_bin, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )


# What differs between any two boots of the same kernel, local ones too: the last console
# lines a run keeps (under TCG the kernel's timing warnings come and go), besides times, the
# node and where the console log went.
VARIES = ("node", "duration_s", "console_log", "console_tail")


def _json(path: Path) -> dict[str, object]:
    doc = json.loads(path.read_text())
    for run in doc["runs"]:
        for key in VARIES:
            run.pop(key)
    return doc  # type: ignore[no-any-return]


def _junit(path: Path) -> bytes:
    root = ET.parse(path).getroot()
    for el in root.iter():
        for attr in ("time", "timestamp"):
            el.attrib.pop(attr, None)
        if el.tag == "property" and el.get("name") == "node":
            el.set("value", "NODE")
        if el.tag == "failure" and el.text:
            # The failure's message, then the console's last lines and the log's path.
            el.text = el.text.splitlines()[0]
    return ET.tostring(root)


MATRIX = """\
timeout = 120
cmd = ["sh", "-c", "echo out of $(uname -m); echo err of $(uname -m) >&2"]
[[run]]
name = "hangs"
profile = "default"
timeout = 30
cmd = ["sleep", "600"]
[[run]]
name = "x86"
profile = "default"
[[run]]
name = "arm64"
profile = "aarch64-virt"
[[run]]
name = "fails"
profile = "default"
cmd = ["sh", "-c", "echo failing; exit 3"]
"""


def test_matrix_on_slurm_reports_as_a_local_matrix_does(
    cluster: Path, qlaunch_bin: list[str], tmp_path: Path
) -> None:
    (tmp_path / "m.toml").write_text(MATRIX)
    env = _env(tmp_path)
    out: dict[str, subprocess.CompletedProcess[str]] = {}
    for on in ("local", "slurm"):
        args = ["exec", "--matrix", "m.toml", "--on", on]
        args += ["--junit", f"{on}.xml", "--json", f"{on}.json"]
        args += ["--jobs", "2"] if on == "local" else []
        out[on] = _qlaunch(qlaunch_bin, args, tmp_path, env)
        assert out[on].returncode == 1, out[on].stderr

    assert _json(tmp_path / "slurm.json") == _json(tmp_path / "local.json")
    assert _junit(tmp_path / "slurm.xml") == _junit(tmp_path / "local.xml")
    runs = {r["name"]: r for r in json.loads((tmp_path / "slurm.json").read_text())["runs"]}
    assert {n: (r["code"], r["verdict"]) for n, r in runs.items()} == {
        "hangs": (124, "timeout"),
        "x86": (0, "exit"),
        "arm64": (0, "exit"),
        "fails": (3, "exit"),
    }
    assert runs["arm64"]["stdout"] == "out of aarch64\n"
    assert runs["arm64"]["stderr"] == "err of aarch64\n"
    assert {r["node"] for r in runs.values()} == {matrix.this_node()}

    # Each task's console log and result sit beside Slurm's output of it, in the job's
    # directory under the working directory: nothing of it on the submitting host's /run.
    for r in runs.values():
        cell = Path(r["console_log"]).parent
        assert cell.parent.parent == tmp_path and cell.parent.name.startswith("qlaunch-matrix-")
        assert {p.name for p in cell.iterdir()} == {"console.log", "result.json", "slurm.out"}
    assert "out of x86_64" in (Path(runs["x86"]["console_log"]).parent / "slurm.out").read_text()

    # The terminal shows what a local matrix shows, and the node.
    s = out["slurm"]
    assert "[arm64] out of aarch64" in s.stdout.splitlines()
    assert "[arm64] err of aarch64" in s.stderr.splitlines()
    assert "qlaunch: [hangs] timed out after 30 s (--timeout): exit 124" in s.stderr
    table = [ln.split() for ln in s.stdout.splitlines() if ln.startswith(("NAME", "fails"))]
    assert ["NAME", "PROFILE", "KERNEL", "RESULT", "CODE", "TIME", "NODE"] in table
    assert any(row[:5] == ["fails", "default", "asset:x86_64", "failed", "3"] for row in table)
    # The last task may still be on its way out when its result is in (COMPLETING).
    assert _eventually(lambda: _squeue() == ""), _squeue()


def test_unseen_kernel_is_refused_then_staged_and_collected_later(
    cluster: Path, qlaunch_bin: list[str], tmp_path: Path
) -> None:
    from qlaunch.boot import assets

    shm = Path(f"/dev/shm/qlaunch-test-{os.getpid()}")
    shm.mkdir()
    try:
        kernel = shm / "bzImage"
        shutil.copy(assets.require("x86_64").kernel, kernel)
        (tmp_path / "m.toml").write_text(
            f'timeout = 120\ncmd = ["uname", "-m"]\n[[run]]\nname = "k"\nkernel = "{kernel}"\n'
        )
        env = _env(tmp_path)
        r = _qlaunch(qlaunch_bin, ["exec", "--matrix", "m.toml", "--on", "slurm"], tmp_path, env)
        assert r.returncode == 2, r.stderr
        assert r.stderr.startswith(f"qlaunch: error: run k: --kernel {kernel} is on tmpfs")
        assert len(r.stderr.splitlines()) == 1
        assert "--stage-dir" in r.stderr
        assert not list(tmp_path.glob("qlaunch-matrix-*"))  # nothing submitted, nothing made

        (tmp_path / "stage").mkdir()
        args = ["exec", "--matrix", "m.toml", "--on", "slurm", "--stage-dir", "stage"]
        r = _qlaunch(qlaunch_bin, [*args, "--no-wait"], tmp_path, env)
        assert r.returncode == 0, r.stderr
        job = r.stdout.strip()
        assert job.isdigit(), r.stdout
        (job_dir,) = (tmp_path / "stage").glob("qlaunch-matrix-*")
        assert f"{job_dir}/stage/" in (job_dir / "matrix.toml").read_text()
    finally:
        shutil.rmtree(shm)  # the copy in the stage directory is what the task boots

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    args = ["matrix", "collect", job, "--json", "c.json", "--junit", "c.xml"]
    r = _qlaunch(qlaunch_bin, args, elsewhere, env)
    assert r.returncode == 0, r.stderr
    (run,) = json.loads((elsewhere / "c.json").read_text())["runs"]
    assert (run["name"], run["code"], run["stdout"]) == ("k", 0, "x86_64\n")
    assert run["kernel"] == str(kernel)  # as the matrix names it, not the staged copy
    assert run["node"] == matrix.this_node()
    assert Path(run["console_log"]).parent == job_dir / "0"
    assert "[k] x86_64" in r.stdout.splitlines()
    # Collected again: the same results, from the files.
    r = _qlaunch(qlaunch_bin, ["matrix", "collect", str(job_dir)], elsewhere, env)
    assert r.returncode == 0 and "[k] x86_64" in r.stdout.splitlines(), r.stderr


def _job_processes(job: str) -> list[int]:
    """Processes that Slurm started for the job's tasks (QEMU inherits their environment)."""
    found = []
    for p in Path("/proc").iterdir():
        if not p.name.isdigit():
            continue
        try:
            environ = (p / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"SLURM_ARRAY_JOB_ID={job}".encode() in environ:
            found.append(int(p.name))
    return found


def test_ctrl_c_cancels_the_job(cluster: Path, qlaunch_bin: list[str], tmp_path: Path) -> None:
    # Three sizes of run in one job: Slurm is asked for each one's own memory and time.
    (tmp_path / "m.toml").write_text(
        'timeout = 300\ncmd = ["sleep", "600"]\n'
        '[[run]]\nname = "a"\nprofile = "default"\n'
        '[[run]]\nname = "b"\nprofile = "default"\nmemory = "384M"\n'
        '[[run]]\nname = "c"\nprofile = "default"\ntimeout = 100\n'
    )
    proc = subprocess.Popen(
        [*qlaunch_bin, "exec", "--matrix", "m.toml", "--on", "slurm"],
        cwd=tmp_path,
        env=_env(tmp_path),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 120
        job = ""
        while time.monotonic() < deadline:
            jobs = list(tmp_path.glob("qlaunch-matrix-*/job.json"))
            if jobs and not job:
                job = json.loads(jobs[0].read_text())["job_id"]
            # Both CPUs taken, a guest in each (its console log has begun), one task waiting.
            logs = list(tmp_path.glob("qlaunch-matrix-*/*/console.log"))
            if job and _squeue(job).count("RUNNING") == 2 and len(logs) == 2:
                break
            time.sleep(0.5)
        else:
            pytest.fail(f"the tasks did not start: {_squeue()}")
        assert _job_processes(job)
        asked = subprocess.run(
            ["squeue", "--noheader", "--array", f"--jobs={job}", "--format=%K %C %m %l"],
            capture_output=True,
            text=True,
            timeout=60,
        ).stdout
        # Guest RAM plus 256 MiB; the timeout plus a minute, in whole minutes.
        assert sorted(asked.split("\n")[:-1]) == ["0 1 512M 6:00", "1 1 640M 6:00", "2 1 512M 3:00"]
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, err
    assert f"qlaunch: cancelling job {job} (scancel)" in err
    assert _squeue(job) == ""
    assert _eventually(lambda: _job_processes(job) == []), _job_processes(job)


def test_slurm_missing_or_silent_is_one_line_exit_3(
    qlaunch_bin: list[str], tmp_path: Path, cluster: Path
) -> None:
    (tmp_path / "m.toml").write_text('cmd = ["true"]\n[[run]]\nprofile = "default"\n')
    args = ["exec", "--matrix", "m.toml", "--on", "slurm"]
    empty = tmp_path / "bin"
    empty.mkdir()
    r = _qlaunch(qlaunch_bin, args, tmp_path, dict(_env(tmp_path), PATH=str(empty)))
    assert (r.returncode, r.stderr.count("\n")) == (3, 1), r.stderr
    assert r.stderr.startswith("qlaunch: error: Slurm is not installed here: no sinfo")

    conf = (cluster / "slurm.conf").read_text()
    # A controller port nothing listens on; a short MessageTimeout so the clients give up soon.
    dead = re.sub(r"SlurmctldPort=\d+", f"SlurmctldPort={_free_port()}", conf)
    dead += "MessageTimeout=2\n"
    (tmp_path / "dead.conf").write_text(dead)
    env = dict(_env(tmp_path), SLURM_CONF=str(tmp_path / "dead.conf"))
    r = _qlaunch(qlaunch_bin, args, tmp_path, env)
    assert (r.returncode, r.stderr.count("\n")) == (3, 1), r.stderr
    assert r.stderr.startswith("qlaunch: error: Slurm is not answering: sinfo: ")
    assert not list(tmp_path.glob("qlaunch-matrix-*"))
