"""`qlaunch exec` on several profiles at once: cells, parallel runs, a summary, JUnit and JSON.

What every backend shares: a matrix file becomes cells (ExecSpecs with distinct names), and
results become the summary table, JUnit and JSON, whichever backend ran them. The local backend
is here: runs are threads, each driving its own QEMU (the emulation happens in QEMU's
processes, so a thread per run costs nothing); at most `jobs` at once, by default one per host
core. Each run's output lines reach the terminal as they come, prefixed with the run's name.
The Slurm backend (qlaunch.testloop.slurm) hands each cell to a job array task instead.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import shutil
import socket
import sys
import tempfile
import threading
import time
import tomllib
import xml.etree.ElementTree as ET
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any, BinaryIO

from qlaunch.errors import QlaunchError, UsageError
from qlaunch.storage import outfile
from qlaunch.testloop import driver as testloop

# Matrix file keys and the ExecSpec field each sets (lists where the CLI flag repeats).
_KEYS: dict[str, tuple[str, type]] = {
    "name": ("name", str),
    "profile": ("profile", str),
    "kernel": ("kernel", str),
    "arch": ("arch", str),
    "modules": ("modules", str),
    "module": ("module", list),
    "share": ("shares", list),
    "share_type": ("share_type", str),
    "set": ("sets", list),
    "cmd": ("cmd", list),
    "cpus": ("cpus", int),
    "memory": ("memory", str),
    "append": ("append", str),
    "timeout": ("timeout", float),
    "watchdog": ("watchdog", float),
    "fail_on_warn": ("fail_on_warn", bool),
    "boot_failure_exit": ("boot_failure_exit", int),
}


def _apply(spec: testloop.ExecSpec, table: dict[str, Any], where: str) -> testloop.ExecSpec:
    changes: dict[str, Any] = {}
    for key, value in table.items():
        if key == "run":
            continue
        if key not in _KEYS:
            raise UsageError(
                f"{where}: unknown key {key!r}", hint="known keys: " + ", ".join(sorted(_KEYS))
            )
        field_name, typ = _KEYS[key]
        ok = (
            isinstance(value, (int, float)) and not isinstance(value, bool)
            if typ is float
            else isinstance(value, typ) and not (typ is int and isinstance(value, bool))
        )
        if not ok or (typ is list and not all(isinstance(v, str) for v in value)):
            raise UsageError(f"{where}: {key} must be a {typ.__name__}, not {value!r}")
        _check_value(key, value, where)
        if key == "share":
            value = tuple(testloop.parse_share(v) for v in value)
        elif typ is list:
            value = tuple(value)
        elif typ is float:
            value = float(value)
        changes[field_name] = value
    return dataclasses.replace(spec, **changes)


def _check_value(key: str, value: Any, where: str) -> None:
    """The ranges the command line's flags have (--cpus, --timeout, ...), so that a matrix
    cell is refused as the same flag would be, before anything boots."""
    if key == "cpus" and value < 1:
        raise UsageError(f"{where}: cpus must be 1 or more, not {value}")
    if key in ("timeout", "watchdog") and not (math.isfinite(value) and value > 0):
        raise UsageError(f"{where}: {key} must be more than 0 seconds, not {value}")
    if key == "share_type" and value not in ("auto", "virtiofs", "9p"):
        raise UsageError(f"{where}: share_type must be auto, virtiofs or 9p, not {value!r}")
    if key == "boot_failure_exit" and not 0 <= value <= 255:
        raise UsageError(f"{where}: boot_failure_exit takes 0 to 255, not {value}")


def load_matrix(path: str, base: testloop.ExecSpec) -> list[testloop.ExecSpec]:
    """Specs from a TOML file: top-level keys apply to every [[run]], a run's own keys win.

    timeout = 600
    cmd = ["sh", "-c", "uname -m"]
    [[run]]
    profile = "default"
    [[run]]
    name = "arm64"
    profile = "aarch64-virt"
    """
    outfile.require_file(path, "--matrix")
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except OSError as e:
        raise UsageError(f"--matrix {path}: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise UsageError(f"--matrix {path}: not valid TOML: {e}") from None
    except UnicodeDecodeError as e:
        raise UsageError(
            f"--matrix {path}: not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset {e.start})",
            hint="TOML files are UTF-8",
        ) from None
    runs = data.get("run")
    if not isinstance(runs, list) or not runs or not all(isinstance(r, dict) for r in runs):
        raise UsageError(f"--matrix {path}: needs at least one [[run]] table")
    common = _apply(base, data, path)
    return [_apply(common, r, f"{path}: [[run]] #{i}") for i, r in enumerate(runs)]


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        # JSON's escapes are TOML's (\uXXXX for control characters); DEL must be escaped too.
        return json.dumps(value, ensure_ascii=False).replace("\x7f", "\\u007f")
    return "[" + ", ".join(_toml(v) for v in value) + "]"


def _share_text(share: testloop.Share) -> str:
    return f"{share.host}:{share.guest}" + (":ro" if share.readonly else "")


def matrix_toml(specs: Sequence[testloop.ExecSpec], header: str = "") -> bytes:
    """A matrix file that load_matrix reads back as exactly these specs: every key spelled
    out in each [[run]], nothing left to the command line (console_log aside: it is per run).
    Paths are written as they are: the caller makes them absolute for where it is read."""
    fields = {f: key for key, (f, _) in _KEYS.items()}
    lines = [f"# {line}".rstrip() for line in header.splitlines()]
    for spec in specs:
        lines += ["", "[[run]]"]
        # The name first: it is what a reader looks for in each table.
        order = sorted(dataclasses.fields(spec), key=lambda f: f.name != "name")
        for f in order:
            value = getattr(spec, f.name)
            if f.name not in fields or value is None:
                continue
            if f.name == "shares":
                value = [_share_text(s) for s in value]
            lines.append(f"{fields[f.name]} = {_toml(value)}")
    try:
        return ("\n".join(lines) + "\n").encode()
    except UnicodeEncodeError as e:
        raise UsageError(
            f"a run's {e.object[max(0, e.start - 20) : e.end]!r} is not valid text: "
            "it cannot go into a matrix file",
            hint="names, paths and arguments must be UTF-8",
        ) from None


def unique_names(specs: Sequence[testloop.ExecSpec]) -> list[testloop.ExecSpec]:
    """Every run gets a distinct name (its profile's, numbered when one repeats)."""
    out: list[testloop.ExecSpec] = []
    seen: dict[str, int] = {}
    for s in specs:
        name = s.name or s.profile or (s.kernel or "default").replace("asset:", "")
        name = re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-") or "run"
        seen[name] = seen.get(name, 0) + 1
        if seen[name] > 1:
            name = f"{name}-{seen[name]}"
        out.append(dataclasses.replace(s, name=name))
    return out


class PrefixSink:
    """Whole lines, prefixed with the run's name, so parallel runs stay readable."""

    def __init__(
        self,
        name: str,
        lock: threading.Lock,
        note: Callable[[str], None],
        shown: set[str] | None = None,
    ) -> None:
        self.name = name
        self.lock = lock
        self._note = note
        # Notes every run gives alike (the accelerator's) are shown once, without a name.
        self._shown = shown if shown is not None else set()
        self.notes: list[str] = []
        self._held: dict[str, bytes] = {"out": b"", "err": b""}

    def _lines(self, which: str, data: bytes, stream: BinaryIO) -> None:
        data = self._held[which] + data
        *lines, self._held[which] = data.split(b"\n")
        if lines:
            prefix = f"[{self.name}] ".encode()
            with self.lock:
                stream.write(b"".join(prefix + ln + b"\n" for ln in lines))
                stream.flush()

    def stdout(self, data: bytes) -> None:
        self._lines("out", data, sys.stdout.buffer)

    def stderr(self, data: bytes) -> None:
        self._lines("err", data, sys.stderr.buffer)

    def console(self, data: bytes) -> None:
        self._lines("err", data, sys.stderr.buffer)

    def note(self, message: str) -> None:
        self.notes.append(message)
        with self.lock:
            if message.startswith("using TCG"):
                if message not in self._shown:
                    self._shown.add(message)
                    self._note(message)
                return
            self._note(f"[{self.name}] {message}")

    def close(self) -> None:
        for which, stream in (("out", sys.stdout.buffer), ("err", sys.stderr.buffer)):
            if self._held[which]:
                self._lines(which, b"\n", stream)


def error_result(name: str, profile: str, kernel: str, e: QlaunchError) -> testloop.Result:
    """A run that stopped with an error before or instead of a verdict (QEMU failed, or on a
    Slurm node: the kernel or assets are not there): its code is the error's."""
    hint = f" (hint: {e.hint})" if e.hint else ""
    return testloop.Result(
        name=name,
        code=e.exit_code,
        stdout="",
        stderr="",
        console="",
        verdict="error",
        message=f"{e.message}{hint}",
        profile=profile,
        kernel=kernel,
    )


def prepare_all(specs: Sequence[testloop.ExecSpec]) -> list[tuple[testloop.Plan, Path]]:
    """Every run's plan (profile, kernel, initramfs...), each in a temporary directory of its
    own, before any boots: a mistake in one run stops them all, with that run's name, as the
    same mistake on the command line would. A failure removes what was made so far."""
    made: list[tuple[testloop.Plan, Path]] = []
    try:
        for spec in specs:
            tmp = Path(tempfile.mkdtemp(prefix="qlaunch-exec-"))
            try:
                made.append((testloop.prepare(spec, tmp), tmp))
            except QlaunchError as e:
                shutil.rmtree(tmp, ignore_errors=True)
                e.message = f"run {spec.name}: {e.message}"
                raise
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
    except BaseException:
        for _, tmp in made:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    return made


def run_matrix(
    specs: Sequence[testloop.ExecSpec],
    *,
    jobs: int | None = None,
    show_console: bool = False,
    note: Callable[[str], None],
) -> list[testloop.Result]:
    specs = unique_names(specs)
    plans = prepare_all(specs)
    try:
        return _run_plans(plans, jobs=jobs, show_console=show_console, note=note)
    finally:
        for _, tmp in plans:
            shutil.rmtree(tmp, ignore_errors=True)


def _run_plans(
    plans: Sequence[tuple[testloop.Plan, Path]],
    *,
    jobs: int | None,
    show_console: bool,
    note: Callable[[str], None],
) -> list[testloop.Result]:
    lock = threading.Lock()
    shown: set[str] = set()
    workers = max(1, min(jobs or os.cpu_count() or 1, len(plans)))

    threads: set[threading.Thread] = set()
    interrupted = threading.Event()

    def one(plan: testloop.Plan) -> testloop.Result:
        with lock:
            threads.add(threading.current_thread())
        sink = PrefixSink(plan.name, lock, note, shown)
        try:
            result = testloop.execute(plan, sink, show_console=show_console)
            result.notes = list(sink.notes)
        except QlaunchError as e:
            result = error_result(plan.name, plan.profile.name, plan.kernel_label, e)
        finally:
            sink.close()
        if not interrupted.is_set():  # a run we killed has nothing to report
            for line in result.report():
                sink.note(line)
        return result

    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="qlaunch-exec") as pool:
        futures = [pool.submit(one, plan) for plan, _ in plans]
        try:
            return [f.result() for f in futures]
        except BaseException:
            # Ctrl-C or SIGTERM: end the runs now rather than wait for each to finish.
            interrupted.set()
            for f in futures:
                f.cancel()
            while not all(f.done() for f in futures):
                with lock:
                    running = set(threads)
                testloop.kill_runs(running)
                wait(futures, timeout=0.2)
            raise


def this_node() -> str:
    """The name a run's node goes by in reports: the host's short name, as Slurm's are."""
    return socket.gethostname().split(".")[0]


def _nodes(results: Sequence[testloop.Result], nodes: Sequence[str] | None) -> list[str]:
    return list(nodes) if nodes is not None else [this_node()] * len(results)


def summary_rows(
    results: Sequence[testloop.Result], nodes: Sequence[str] | None = None
) -> list[dict[str, Any]]:
    return [
        {
            "name": r.name,
            "profile": r.profile,
            "kernel": r.kernel,
            "result": "ok" if r.ok else ("failed" if r.verdict == "exit" else r.verdict),
            "code": r.code,
            "time": f"{r.duration:.1f}s",
            "node": node,
        }
        for r, node in zip(results, _nodes(results, nodes), strict=True)
    ]


SUMMARY_COLUMNS = ("name", "profile", "kernel", "result", "code", "time")

# XML 1.0 allows no control characters but tab, LF and CR.
_XML_BAD = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ufffe\uffff]")


def _xml_text(text: str) -> str:
    return _XML_BAD.sub("\ufffd", text)


def junit_xml(
    results: Sequence[testloop.Result],
    suite: str = "qlaunch exec",
    nodes: Sequence[str] | None = None,
) -> bytes:
    failures = sum(1 for r in results if not r.ok and r.verdict != "error")
    errors = sum(1 for r in results if r.verdict == "error")
    total_time = f"{sum(r.duration for r in results):.3f}"
    root = ET.Element(
        "testsuites",
        name=suite,
        tests=str(len(results)),
        failures=str(failures),
        errors=str(errors),
        time=total_time,
    )
    ts = ET.SubElement(
        root,
        "testsuite",
        name=suite,
        tests=str(len(results)),
        failures=str(failures),
        errors=str(errors),
        skipped="0",
        time=total_time,
        timestamp=time.strftime("%Y-%m-%dT%H:%M:%S"),
    )
    for r, node in zip(results, _nodes(results, nodes), strict=True):
        tc = ET.SubElement(
            ts,
            "testcase",
            classname=f"qlaunch.exec.{r.profile or 'run'}",
            name=r.name,
            time=f"{r.duration:.3f}",
        )
        # Where it ran: cells of one matrix run on many nodes (pytest writes properties so).
        props = ET.SubElement(tc, "properties")
        ET.SubElement(props, "property", name="node", value=_xml_text(node))
        if r.verdict == "error":
            el = ET.SubElement(tc, "error", message=_xml_text(r.message), type="error")
            el.text = _xml_text(r.message)
        elif not r.ok:
            message = r.message or f"exit status {r.code}"
            el = ET.SubElement(tc, "failure", message=_xml_text(message), type=r.verdict)
            el.text = _xml_text("\n".join(r.report()) or message)
        if r.stdout:
            ET.SubElement(tc, "system-out").text = _xml_text(r.stdout)
        if r.stderr:
            ET.SubElement(tc, "system-err").text = _xml_text(r.stderr)
    ET.indent(root)
    return bytes(ET.tostring(root, encoding="utf-8", xml_declaration=True)) + b"\n"


def write_junit(
    path: str, results: Sequence[testloop.Result], nodes: Sequence[str] | None = None
) -> None:
    _write(path, junit_xml(results, nodes=nodes))


def json_report(
    results: Sequence[testloop.Result], nodes: Sequence[str] | None = None
) -> dict[str, Any]:
    return {
        "ok": all(r.ok for r in results),
        "runs": [
            {**r.as_dict(), "node": node}
            for r, node in zip(results, _nodes(results, nodes), strict=True)
        ],
    }


def write_json(
    path: str, results: Sequence[testloop.Result], nodes: Sequence[str] | None = None
) -> None:
    _write(path, (json.dumps(json_report(results, nodes), indent=2) + "\n").encode())


def result_from_dict(run: dict[str, Any]) -> tuple[testloop.Result, str]:
    """A run of a JSON report back as a Result and its node (what a Slurm task wrote)."""
    r = testloop.Result(
        name=str(run["name"]),
        code=int(run["code"]),
        stdout=str(run.get("stdout") or ""),
        stderr=str(run.get("stderr") or ""),
        console="",  # the whole console is in the console log, not in reports
        verdict=str(run["verdict"]),
        message=str(run.get("message") or ""),
        excerpt=[str(x) for x in run.get("excerpt") or []],
        console_tail=[str(x) for x in run.get("console_tail") or []],
        console_log=run.get("console_log"),
        duration=float(run.get("duration_s") or 0.0),
        command_status=run.get("command_status"),
        profile=str(run.get("profile") or ""),
        kernel=str(run.get("kernel") or ""),
    )
    return r, str(run.get("node") or "")


def _write(path: str, data: bytes) -> None:
    outfile.write_bytes(path, data)


def is_junit(p: Path) -> bool:
    """A JUnit report that qlaunch exec wrote (it may replace one without --force)."""
    with open(p, "rb") as f:
        head = f.read(512)
    return head.startswith(b"<?xml") and b'<testsuites name="qlaunch exec"' in head


def is_json_report(p: Path) -> bool:
    """A JSON report that qlaunch exec wrote."""
    if p.stat().st_size > 256 << 20:
        return False
    doc = json.loads(p.read_bytes())
    return isinstance(doc, dict) and set(doc) == {"ok", "runs"} and isinstance(doc["runs"], list)
