"""The stop ladder: guest agent shutdown, wait; ACPI powerdown, wait; QMP quit, wait;
SIGTERM, wait; SIGKILL.

Each step is logged in the VM's vm.log and reported (on_step, and the StopReport). `force`
skips the agent and ACPI; `modes` picks which of the two graceful steps to try. The agent
step is taken only when an agent answers guest-ping within AGENT_PING (a guest without one
goes straight to ACPI, with no step reported): a guest without a power-button handler still
shuts down cleanly through it. A paused guest can neither run its agent nor see the power
button, so both are skipped for it, and so is ACPI on a board where system_powerdown reaches
no guest at all (boards.cannot: malta, the vexpress and raspi boards), instead of waiting out
the whole timeout for nothing.
A VM counts as stopped only once QEMU's process is gone: reaped by its supervisor, which
records the exit; or, with the supervisor dead, gone from /proc (or a zombie that its new
parent does not reap: we cannot waitpid a process that is not our child), recorded by us
from what /proc still says.

Signals go only to a process that `state.identify` confirms is this VM's QEMU.
"""

from __future__ import annotations

import json
import logging
import signal
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from qlaunch.errors import QemuError, QlaunchError, StateError, UsageError
from qlaunch.vm import state
from qlaunch.vm.state import Exit

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    from qlaunch.vm.api import VM

QMP_CONNECT = 3.0  # a monitor that gives no greeting in this time is not going to
QUIT_WAIT = 10.0
TERM_WAIT = 5.0
KILL_WAIT = 10.0
RECORD_WAIT = 10.0  # for a live supervisor to reap and record
ACPI_REPEAT = 5.0  # press the power button again after this long
AGENT_PING = 2.0  # an agent that does not answer guest-ping in this time is not used
MODES = ("agent", "acpi")  # the graceful steps, in the order they are tried


@dataclass
class Step:
    action: str  # "agent shutdown", "acpi powerdown", "qmp quit", "SIGTERM", "SIGKILL"
    result: str
    ended: bool  # QEMU was gone after this step
    seconds: float


@dataclass
class StopReport:
    name: str
    was: str  # the state before
    state: str = state.STOPPED  # the state after
    steps: list[Step] = field(default_factory=list)
    exit: Exit | None = None
    note: str | None = None

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["exit"] = dict(d["exit"], describe=self.exit.describe()) if self.exit else None
        return d


def stop(
    vm: VM,
    *,
    timeout: float = 60.0,
    force: bool = False,
    on_step: Callable[[str], None] | None = None,
    lock_timeout: float = 30.0,
    modes: Sequence[str] = MODES,
) -> StopReport:
    with state.locked(vm.name, "stop", lock_timeout, vm.base):
        return stop_locked(vm, timeout=timeout, force=force, on_step=on_step, modes=modes)


def check_modes(modes: Sequence[str]) -> tuple[str, ...]:
    bad = [m for m in modes if m not in MODES]
    if bad or not modes:
        raise UsageError(
            f"stop mode {(bad or [''])[0]!r} is not one of {', '.join(MODES)}",
            hint="e.g. --mode agent,acpi (the default) or --mode acpi",
        )
    return tuple(m for m in MODES if m in modes)


def stop_locked(
    vm: VM,
    *,
    timeout: float,
    force: bool,
    on_step: Callable[[str], None] | None,
    modes: Sequence[str] = MODES,
) -> StopReport:
    """The ladder, for a caller that holds the VM's lock."""
    modes = check_modes(modes)
    d = vm.dir
    live = state.inspect(d)
    report = StopReport(vm.name, was=live.state)

    def step(action: str, result: str, ended: bool, t0: float) -> None:
        report.steps.append(Step(action, result, ended, round(time.monotonic() - t0, 2)))
        state.log(d, f"stop: {action}: {result}")
        if on_step:
            on_step(f"{action}: {result}")

    if not live.alive:
        live = state.settle(d)
        report.state, report.note = live.state, f"already {live.state}"
        report.exit = live.record.last_exit
        return report

    state.update(d, _request_stop)
    rec = live.record
    q = rec.qemu if live.qemu is not None else None
    if q is None:
        # Between restarts: the supervisor sees stop_requested and ends without QEMU.
        t0 = time.monotonic()
        live = _recorded(vm, None)
        step("cancel restart", f"the supervisor ended the VM ({live.state})", True, t0)
        report.state, report.exit = live.state, None
        return report

    ended = False
    paused = rec.state == state.PAUSED or rec.runstate not in (None, "running")
    if not force and "agent" in modes and not paused:
        ended = _agent_shutdown(vm, q, timeout, step)
    if not force and "acpi" in modes and not ended:
        t0 = time.monotonic()
        no_button = _no_power_button(vm)
        if paused:
            step("acpi powerdown", "skipped: the guest is paused and cannot see it", False, t0)
        elif no_button:
            step("acpi powerdown", f"skipped: {no_button}", False, t0)
        else:
            try:
                ended = _press_power_button(vm, q, timeout)
                result = (
                    "the guest powered off"
                    if ended
                    else f"sent; the guest did not power off within {timeout:g} s"
                )
                step("acpi powerdown", result, ended, t0)
            except QlaunchError as e:
                step("acpi powerdown", f"not sent: {e.message}", False, t0)
    if not ended:
        t0 = time.monotonic()
        try:
            with vm.monitor(QMP_CONNECT, purpose="stop") as mon:
                mon.quit(QUIT_WAIT)
            ended = state.wait_gone(q.pid, q.start_ticks, QUIT_WAIT)
            step(
                "qmp quit",
                "QEMU quit" if ended else f"sent; QEMU still there after {QUIT_WAIT:g} s",
                ended,
                t0,
            )
        except QlaunchError as e:
            step("qmp quit", f"failed: {e.message}", False, t0)
    for sig, wait in ((signal.SIGTERM, TERM_WAIT), (signal.SIGKILL, KILL_WAIT)):
        if ended:
            break
        t0 = time.monotonic()
        name = state.signal_name(sig)
        if not state.signal_identified(q, state.qemu_marker(rec.uuid), sig, "QEMU"):
            ended = True
            step(name, f"not sent: pid {q.pid} is no longer this VM's QEMU", True, t0)
            break
        ended = state.wait_gone(q.pid, q.start_ticks, wait)
        result = "QEMU ended" if ended else f"sent; QEMU still there after {wait:g} s"
        step(name, result, ended, t0)
    if not ended:
        raise QemuError(
            f"VM {vm.name}: QEMU (pid {q.pid}) survived SIGKILL",
            hint="it may be stuck in the kernel (state D); see /proc/PID/stack",
        )
    live = _recorded(vm, q)
    report.state = live.state
    report.exit = live.record.last_exit
    if live.record.supervisor is None and report.exit and report.exit.reason == "unsupervised":
        report.note = "its supervisor was gone, so qlaunch recorded the exit from /proc"
    return report


def _agent_shutdown(
    vm: VM, q: state.Proc, timeout: float, step: Callable[[str, str, bool, float], None]
) -> bool:
    """guest-shutdown (powerdown) when an agent answers guest-ping; then wait up to timeout
    for QEMU to end. True once it has. No agent: no step, only a line in vm.log."""
    from qlaunch.vm import agent

    t0 = time.monotonic()
    try:
        with agent.connect(vm, AGENT_PING, purpose="stop", lock_timeout=AGENT_PING) as ga:
            ga.execute("guest-ping", timeout=AGENT_PING)
            ga.shutdown("powerdown")
    except agent.AgentError as e:
        step("agent shutdown", f"refused: {e.desc}", False, t0)
        return False
    except StateError as e:  # no agent answering (AgentUnavailable), or its lock is held
        state.log(vm.dir, f"stop: agent shutdown: skipped: {e.message}")
        return False
    ended = state.wait_gone(q.pid, q.start_ticks, timeout)
    result = (
        "the guest powered off"
        if ended
        else f"sent; the guest did not power off within {timeout:g} s"
    )
    step("agent shutdown", result, ended, t0)
    return ended


def _no_power_button(vm: VM) -> str | None:
    """Why system_powerdown reaches no guest on this VM's board, or None when it does (or
    the board cannot be told from the record: then the button is pressed as always)."""
    from qlaunch.config import boards
    from qlaunch.config import profile as profmod

    try:
        pj = json.loads((vm.dir / "profile.json").read_bytes())
        board = profmod.build(pj["profile"], name=pj["name"], source="the VM's profile").board
    except (QlaunchError, OSError, ValueError, KeyError, TypeError):
        return None
    return boards.cannot(board).get("powerdown")


def _press_power_button(vm: VM, q: state.Proc, timeout: float) -> bool:
    """system_powerdown, again every ACPI_REPEAT s until QEMU is gone or timeout passes: a
    guest still booting (a VM stopped right after start) misses a press, and would otherwise
    keep the stop waiting out all of timeout. True once QEMU is gone."""
    deadline = time.monotonic() + timeout
    pressed = False
    while True:
        try:
            with vm.monitor(QMP_CONNECT, purpose="stop") as mon:
                mon.execute("system_powerdown")
            pressed = True
        except QlaunchError:
            if not pressed:
                raise  # never sent: the caller reports why
            # QEMU may be going away as the guest powers off: the wait below tells.
        left = deadline - time.monotonic()
        if state.wait_gone(q.pid, q.start_ticks, max(0.0, min(ACPI_REPEAT, left))):
            return True
        if left <= ACPI_REPEAT:
            return False


def _request_stop(r: state.Record) -> None:
    r.stop_requested = True


def _recorded(vm: VM, q: state.Proc | None) -> state.Live:
    """After QEMU is gone: wait for a live supervisor to reap and record it, or settle the
    record ourselves when there is none."""
    deadline = time.monotonic() + RECORD_WAIT
    while True:
        live = state.inspect(vm.dir)
        if live.supervisor is None:
            return state.settle(vm.dir)
        if live.record.state in state.FINAL:
            # The supervisor has written its last word; let it finish leaving.
            state.wait_gone(live.supervisor.pid, live.supervisor.start_ticks, 2.0)
            return state.inspect(vm.dir)
        if time.monotonic() >= deadline:
            return live
        time.sleep(0.05)
