"""Internal snapshots of a running VM: disks and guest state inside its qcow2 images.

    from qlaunch.vm import snapshot
    snapshot.create("web", "before-upgrade")   # every writable disk + RAM and devices
    snapshot.list_("web")                      # [Snapshot(tag=..., date=..., vm_state_size=...)]
    snapshot.revert("web", "before-upgrade")   # disks and guest back to that instant
    snapshot.delete("web", "before-upgrade")

These are QEMU's `snapshot-save`, `snapshot-load` and `snapshot-delete` jobs (7.2 has them;
unlike HMP savevm they take explicit nodes and do not block the monitor). Every writable disk
takes part, so disks and RAM stay consistent; the guest state (vmstate) goes into the first
one. So every writable disk must be qcow2: a raw disk cannot hold a snapshot, and leaving it
out would bring back RAM that no longer matches it. Read-only disks (CD-ROMs, the cloud-init
seed) cannot change, so they are left out.

When the guest's agent answers, `create` freezes the guest's file systems around the job
(guest-fsfreeze-freeze, thawed in any case afterwards), so the disks in the snapshot are
clean on their own too (e.g. for `qemu-img snapshot -a` on a stopped VM). The guest state it
saves is then a frozen one: `revert` thaws the guest's file systems after loading when its
agent says they are frozen. No agent: a snapshot as consistent as RAM and disks together are.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qlaunch.errors import QemuError, StateError, UsageError
from qlaunch.vm import state

if TYPE_CHECKING:
    from qlaunch.vm.api import VM
    from qlaunch.vm.qmp import Monitor

JOB_TIMEOUT = 600.0
AGENT_PING = 2.0  # an agent that does not answer in this time is not waited for
Note = Callable[[str], None]


@dataclass(frozen=True)
class Snapshot:
    tag: str
    id: str
    date: float  # when it was taken (seconds since the epoch)
    vm_clock: float  # the guest's clock then (seconds since its start)
    vm_state_size: int  # bytes of guest state; 0 for a disk-only snapshot
    disks: tuple[str, ...]  # the devices (disk0, hpdisk1...) that hold it

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class _Node:
    device: str
    node: str
    file: str
    fmt: str


def _check_tag(tag: str) -> str:
    if not tag or len(tag) > 128 or not tag.isprintable() or tag.strip() != tag:
        raise UsageError(f"{tag!r} is not a snapshot tag", hint="use a short printable name")
    return tag


def _nodes(mon: Monitor, vm: VM) -> list[_Node]:
    """The writable disks' top nodes; UsageError if one of them cannot hold a snapshot."""
    nodes: list[_Node] = []
    unfit: list[_Node] = []
    for b in mon.execute("query-block"):
        ins = b.get("inserted")
        if not ins or ins.get("ro"):
            continue
        n = _Node(_device(b), str(ins["node-name"]), str(ins.get("file")), str(ins.get("drv")))
        (nodes if n.fmt == "qcow2" else unfit).append(n)
    nodes += _hotplugged(mon, vm, {n.node for n in nodes})
    if unfit:
        raise UsageError(
            f"VM {vm.name}: disk {unfit[0].file} is {unfit[0].fmt}, and internal snapshots "
            "need every writable disk in qcow2",
            hint="convert it (qlaunch image convert) or attach it read-only",
        )
    if not nodes:
        raise UsageError(
            f"VM {vm.name} has no writable qcow2 disk to hold a snapshot",
            hint="add one: --set disk.0.path=data.qcow2 --set disk.0.size=1G",
        )
    return nodes


def _device(b: dict[str, Any]) -> str:
    """A disk's name as the user knows it: the drive id (disk0), or for a disk added with
    blockdev-add (no drive) its device's id from the qdev path."""
    if b.get("device"):
        return str(b["device"])
    parts = str(b.get("qdev") or "?").split("/")
    return parts[3] if len(parts) > 3 and parts[2] == "peripheral" else parts[-1]


def _hotplugged(mon: Monitor, vm: VM, seen: set[str]) -> list[_Node]:
    """Disks added with blockdev-add have no legacy drive, so query-block lists them only
    by their device's path; their node names are in the record."""
    out = []
    for dev in state.read_record(vm.dir).hotplug:
        if dev.get("kind") != "disk" or dev.get("readonly") or dev["node"] in seen:
            continue
        out.append(_Node(dev["id"], dev["node"], dev["path"], dev["format"]))
    bad = [n for n in out if n.fmt != "qcow2"]
    if bad:
        raise UsageError(
            f"VM {vm.name}: hotplugged disk {bad[0].device} ({bad[0].file}) is {bad[0].fmt}; "
            "internal snapshots need every writable disk in qcow2",
            hint=f"qlaunch detach-disk {vm.name} {bad[0].device}, or attach it --readonly",
        )
    return out


def _run_job(mon: Monitor, vm: VM, command: str, args: dict[str, Any]) -> None:
    """Start a job, wait until it concludes, dismiss it; QemuError with QEMU's reason if it
    failed."""
    job_id = f"qlaunch-{command}-{int(time.time() * 1000)}"
    mon.execute(command, {"job-id": job_id, **args})
    deadline = time.monotonic() + JOB_TIMEOUT
    delay = 0.01
    while True:
        jobs = [j for j in mon.execute("query-jobs") if j.get("id") == job_id]
        if not jobs:
            raise QemuError(f"VM {vm.name}: the {command} job vanished")
        job = jobs[0]
        if job.get("status") == "concluded":
            break
        if time.monotonic() > deadline:
            raise QemuError(f"VM {vm.name}: {command} did not finish in {JOB_TIMEOUT:.0f} s")
        time.sleep(delay)
        delay = min(delay * 2, 0.2)
    mon.execute("job-dismiss", {"id": job_id})
    if job.get("error"):
        raise QemuError(f"VM {vm.name}: {command}: {job['error']}")


def _vm(name: str, base: Path | None) -> VM:
    from qlaunch.vm.api import VM

    vm = VM.get(name, base)
    live = vm.live()
    if live.qemu is None:
        raise StateError(
            f"VM {vm.name} is not running (state {live.state})",
            hint="internal snapshots are taken and listed through the running QEMU; for a "
            "stopped VM use: qemu-img snapshot -l IMAGE",
        )
    return vm


def list_(name: str, base: Path | None = None) -> list[Snapshot]:
    """The snapshots in the VM's disks, oldest first; a tag held by only some disks shows
    which."""
    vm = _vm(name, base)
    with vm.monitor(purpose="snapshot list") as mon:
        return _list(mon, vm)


def _list(mon: Monitor, vm: VM) -> list[Snapshot]:
    nodes = _nodes(mon, vm)
    by_node = {
        str(n.get("node-name")): n for n in mon.execute("query-named-block-nodes", {"flat": True})
    }
    found: dict[str, dict[str, Any]] = {}
    for nd in nodes:
        for s in (by_node.get(nd.node, {}).get("image") or {}).get("snapshots", []):
            cur = found.setdefault(str(s["name"]), {"s": s, "disks": []})
            cur["disks"].append(nd.device)
            if s.get("vm-state-size", 0) > cur["s"].get("vm-state-size", 0):
                cur["s"] = s
    out = [
        Snapshot(
            tag=tag,
            id=str(v["s"].get("id")),
            date=v["s"].get("date-sec", 0) + v["s"].get("date-nsec", 0) / 1e9,
            vm_clock=v["s"].get("vm-clock-sec", 0) + v["s"].get("vm-clock-nsec", 0) / 1e9,
            vm_state_size=int(v["s"].get("vm-state-size", 0)),
            disks=tuple(v["disks"]),
        )
        for tag, v in found.items()
    ]
    return sorted(out, key=lambda s: s.date)


def create(name: str, tag: str, base: Path | None = None, note: Note | None = None) -> Snapshot:
    """Snapshot every writable disk and the guest's state under tag (a new tag only). With a
    guest agent, its file systems are frozen meanwhile; note says so."""
    _check_tag(tag)
    vm = _vm(name, base)
    with (
        state.locked(vm.name, "snapshot create", 30.0, vm.base),
        vm.monitor(purpose="snapshot create") as mon,
    ):
        nodes = _nodes(mon, vm)
        if any(s.tag == tag for s in _list(mon, vm)):
            raise UsageError(
                f"VM {vm.name} already has a snapshot {tag!r}",
                hint=f"qlaunch snapshot {vm.name} delete {tag} first, or pick another tag",
            )
        with _frozen(vm, note):
            _run_job(
                mon,
                vm,
                "snapshot-save",
                {"tag": tag, "vmstate": nodes[0].node, "devices": [n.node for n in nodes]},
            )
        snap = next(s for s in _list(mon, vm) if s.tag == tag)
    state.log(vm.dir, f"snapshot: created {tag!r} on {', '.join(snap.disks)}")
    return snap


def revert(name: str, tag: str, base: Path | None = None, note: Note | None = None) -> Snapshot:
    """Bring the disks and the guest back to snapshot tag. A running guest runs on from
    there; a paused one stays paused. File systems the snapshot froze are thawed."""
    _check_tag(tag)
    vm = _vm(name, base)
    with (
        state.locked(vm.name, "snapshot revert", 30.0, vm.base),
        vm.monitor(purpose="snapshot revert") as mon,
    ):
        snap = _find(mon, vm, tag)
        nodes = _nodes(mon, vm)
        if snap.vm_state_size == 0:
            raise UsageError(
                f"snapshot {tag!r} of VM {vm.name} holds no guest state (a disk-only "
                "snapshot, e.g. from qemu-img), so it cannot be loaded into a running VM"
            )
        holder = next(n for n in nodes if n.device in snap.disks)
        _run_job(
            mon,
            vm,
            "snapshot-load",
            {"tag": tag, "vmstate": holder.node, "devices": [n.node for n in nodes]},
        )
    _thaw_after_revert(vm, note)
    state.log(vm.dir, f"snapshot: reverted to {tag!r}")
    return snap


def delete(name: str, tag: str, base: Path | None = None) -> Snapshot:
    _check_tag(tag)
    vm = _vm(name, base)
    with (
        state.locked(vm.name, "snapshot delete", 30.0, vm.base),
        vm.monitor(purpose="snapshot delete") as mon,
    ):
        snap = _find(mon, vm, tag)
        nodes = [n for n in _nodes(mon, vm) if n.device in snap.disks]
        _run_job(mon, vm, "snapshot-delete", {"tag": tag, "devices": [n.node for n in nodes]})
    state.log(vm.dir, f"snapshot: deleted {tag!r}")
    return snap


def _find(mon: Monitor, vm: VM, tag: str) -> Snapshot:
    snaps = _list(mon, vm)
    for s in snaps:
        if s.tag == tag:
            return s
    have = ", ".join(s.tag for s in snaps) or "none"
    raise UsageError(f"VM {vm.name} has no snapshot {tag!r}", hint=f"its snapshots: {have}")


# ---- the guest agent's file system freeze ----------------------------------------------------


@contextlib.contextmanager
def _frozen(vm: VM, note: Note | None) -> Iterator[None]:
    """The body runs with the guest's file systems frozen, when its agent answers; thawed
    afterwards whatever happens. A freeze the agent refuses leaves the snapshot as it would be
    without an agent (said); a freeze that gets no answer ends the snapshot (after a thaw)."""
    from qlaunch.vm import agent

    def say(msg: str) -> None:
        state.log(vm.dir, f"snapshot: {msg}")
        if note:
            note(msg)

    try:
        ga = agent.connect(vm, AGENT_PING, purpose="snapshot freeze", lock_timeout=AGENT_PING)
    except StateError:  # no agent answering, its lock held, or the guest paused
        yield
        return
    try:
        try:
            count = ga.execute("guest-fsfreeze-freeze")
        except agent.AgentError as e:
            say(f"guest file systems not frozen: {e.desc}")
            ga.close()
            yield
            return
        except agent.AgentUnavailable as e:
            # It may have frozen some before it went quiet.
            ga = _thaw(vm, ga, say)
            raise StateError(
                f"VM {vm.name}: the guest agent did not finish freezing its file systems "
                f"({e.message}); no snapshot taken",
                hint="try again; `qlaunch agent NAME guest-fsfreeze-status` shows the state",
            ) from None
        say(f"guest file systems frozen ({count}) for the snapshot")
        try:
            yield
        finally:
            ga = _thaw(vm, ga, say)
    finally:
        ga.close()


def _thaw(vm: VM, ga: Any, say: Note) -> Any:
    """guest-fsfreeze-thaw, on a new session if this one broke. A guest left frozen hangs
    every writer in it, so a thaw that fails is an error with the way out."""
    from qlaunch.vm import agent

    last = ""
    for attempt in range(3):
        try:
            n = ga.execute("guest-fsfreeze-thaw")
            say(f"guest file systems thawed ({n})")
            return ga
        except (agent.AgentUnavailable, agent.AgentError) as e:
            last = e.message
            ga.close()
            time.sleep(0.5 * attempt)
            with contextlib.suppress(StateError):
                ga = agent.connect(vm, agent.CONNECT, purpose="snapshot thaw")
    raise StateError(
        f"VM {vm.name}: could not thaw the guest's file systems: {last}",
        hint=f"qlaunch agent {vm.name} guest-fsfreeze-thaw",
    )


def _thaw_after_revert(vm: VM, note: Note | None) -> None:
    """A snapshot taken frozen loads frozen: thaw it, if the agent says so."""
    from qlaunch.vm import agent

    try:
        with agent.connect(
            vm, AGENT_PING, purpose="snapshot revert", lock_timeout=AGENT_PING
        ) as ga:
            if ga.execute("guest-fsfreeze-status") != "frozen":
                return
            n = ga.execute("guest-fsfreeze-thaw")
    except (StateError, agent.AgentError):
        return
    state.log(vm.dir, f"snapshot: guest file systems thawed after the revert ({n})")
    if note:
        note(f"guest file systems thawed ({n}): the snapshot was taken frozen")
