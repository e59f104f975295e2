"""Disks and NICs plugged into a running VM, and unplugged again.

    from qlaunch.vm import hotplug
    dev = hotplug.attach_disk("web", "data.qcow2")      # {"id": "hpdisk1", "bus": ...}
    hotplug.detach_disk("web", "hpdisk1")               # waits for the guest to let go
    hotplug.attach_nic("web")                           # user-mode NIC: the guest sees ethN
    hotplug.detach_nic("web", "hpnet1")

A disk is a `blockdev-add` (format node over a file node, named after the device) and a
`device_add` of virtio-blk; a NIC is a `netdev_add` and a virtio-net `device_add`. Unplugging
is `device_del`, which only asks the guest: the device is gone when QEMU says DEVICE_DELETED
(the guest's ACPI or PCIe hotplug driver released it); then the backend is removed.

PCIe cannot hotplug onto the root bus: on q35 each device takes one of the free
`pcie-root-port`s that argv adds (argv.HOTPLUG_PORTS); the legacy `pc` machine hotplugs onto
pci.0 directly. Boards without PCI (microvm, the ARM boards' MMIO) have no hotplug.

Each plugged device is recorded in the VM's state (record.hotplug: `status` shows
them) and its arguments are added to argv.json, so a restart of QEMU by the supervisor brings
the VM back with the same devices on the same ports; `save` and `restore` carry them too.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qlaunch.errors import QemuError, StateError, UsageError
from qlaunch.vm import state

if TYPE_CHECKING:
    from qlaunch.config.boards import Board
    from qlaunch.vm.api import VM
    from qlaunch.vm.qmp import Monitor

UNPLUG_TIMEOUT = 60.0
FORMATS = ("qcow2", "raw", "vdi", "vmdk")
NIC_MODES = ("user",)


def devices(name: str, base: Path | None = None) -> list[dict[str, Any]]:
    """The VM's hotplugged devices as recorded."""
    from qlaunch.vm.api import VM

    return list(VM.get(name, base).record().hotplug)


# ---- disks ---------------------------------------------------------------------------------


def attach_disk(
    name: str,
    path: str,
    *,
    fmt: str | None = None,
    readonly: bool = False,
    base: Path | None = None,
    lock_timeout: float = 30.0,
) -> dict[str, Any]:
    """Plug an image file into the running VM as a virtio disk; returns its record."""
    from qlaunch.launch import disks
    from qlaunch.vm.qmp import QMPError

    vm = _running(name, base)
    path = os.path.abspath(path)
    if not os.path.exists(path):
        raise UsageError(
            f"{path} does not exist", hint=f"create it first: qlaunch image create {path} 1G"
        )
    if not os.path.isfile(path):
        raise UsageError(f"{path} is not an image file")
    fmt = fmt or _format_from_name(path)
    if fmt not in FORMATS:
        raise UsageError(f"{fmt!r} is not an image format", hint="one of " + ", ".join(FORMATS))
    with state.locked(vm.name, "attach-disk", lock_timeout, vm.base):
        rec = _live_record(vm)
        for dev in rec.hotplug:
            if dev.get("path") == path:
                raise UsageError(f"{path} is already attached to VM {vm.name} as {dev['id']}")
        # Says who holds the image, where QEMU would only say "Failed to get write lock".
        disks.check_lock(path, fmt, write=not readonly, label="image")
        dev_id = _next_id(rec, "hpdisk")
        blockdev: dict[str, Any] = {
            "driver": fmt,
            "node-name": dev_id,
            "read-only": readonly,
            "file": {"driver": "file", "filename": path, "node-name": f"{dev_id}-file"},
        }
        with vm.monitor(purpose="attach-disk") as mon:
            bus = _free_bus(mon, vm, rec)
            device: dict[str, Any] = {"driver": "virtio-blk-pci", "id": dev_id, "drive": dev_id}
            if bus:
                device["bus"] = bus
            mon.execute("blockdev-add", blockdev)
            try:
                mon.execute("device_add", device)
            except BaseException:
                with contextlib.suppress(QMPError):
                    mon.execute("blockdev-del", {"node-name": dev_id})
                raise
        entry = {
            "id": dev_id,
            "kind": "disk",
            "bus": bus,
            "path": path,
            "format": fmt,
            "readonly": readonly,
            "node": dev_id,
            "args": ["-blockdev", _js(blockdev), "-device", _js(device)],
        }
        _record_add(vm, entry)
    return entry


def detach_disk(
    name: str,
    dev_id: str,
    *,
    timeout: float = UNPLUG_TIMEOUT,
    base: Path | None = None,
    lock_timeout: float = 30.0,
) -> dict[str, Any]:
    """Unplug a hotplugged disk: device_del, wait for the guest to release it, blockdev-del."""
    return _detach(name, dev_id, "disk", timeout, base, lock_timeout)


# ---- NICs ----------------------------------------------------------------------------------


def attach_nic(
    name: str,
    *,
    mode: str = "user",
    model: str | None = None,
    mac: str | None = None,
    base: Path | None = None,
    lock_timeout: float = 30.0,
) -> dict[str, Any]:
    """Plug a NIC into the running VM (user mode: QEMU's NAT); returns its record."""
    from qlaunch.names import stable_mac
    from qlaunch.vm.qmp import QMPError

    if mode not in NIC_MODES:
        raise UsageError(
            f"attach-nic: mode {mode!r} is not supported",
            hint="use --mode user; NICs on qlaunch networks come from the profile at start",
        )
    if mac is not None:
        from qlaunch.config.settings import _mac

        try:
            mac = _mac(mac)
        except ValueError as e:
            raise UsageError(str(e)) from None
    vm = _running(name, base)
    with state.locked(vm.name, "attach-nic", lock_timeout, vm.base):
        rec = _live_record(vm)
        dev_id = _next_id(rec, "hpnet")
        board = _board(vm)
        model = model or board.nic_model or "virtio-net-pci"
        mac = mac or stable_mac(vm.name, 100 + int(dev_id.removeprefix("hpnet")))
        netdev = {"type": mode, "id": dev_id}
        with vm.monitor(purpose="attach-nic") as mon:
            bus = _free_bus(mon, vm, rec)
            device: dict[str, Any] = {"driver": model, "id": dev_id, "netdev": dev_id, "mac": mac}
            if bus:
                device["bus"] = bus
            mon.execute("netdev_add", netdev)
            try:
                mon.execute("device_add", device)
            except BaseException:
                with contextlib.suppress(QMPError):
                    mon.execute("netdev_del", {"id": dev_id})
                raise
        entry = {
            "id": dev_id,
            "kind": "nic",
            "bus": bus,
            "mode": mode,
            "model": model,
            "mac": mac,
            "args": ["-netdev", _js(netdev), "-device", _js(device)],
        }
        _record_add(vm, entry)
    return entry


def detach_nic(
    name: str,
    dev_id: str,
    *,
    timeout: float = UNPLUG_TIMEOUT,
    base: Path | None = None,
    lock_timeout: float = 30.0,
) -> dict[str, Any]:
    """Unplug a hotplugged NIC: device_del, wait for the guest to release it, netdev_del."""
    return _detach(name, dev_id, "nic", timeout, base, lock_timeout)


def _detach(
    name: str, dev_id: str, kind: str, timeout: float, base: Path | None, lock_timeout: float
) -> dict[str, Any]:
    vm = _running(name, base)
    with state.locked(vm.name, f"detach-{kind}", lock_timeout, vm.base):
        entry = _entry(vm, dev_id, kind)
        with vm.monitor(purpose=f"detach-{kind}") as mon:
            _unplug(mon, vm, dev_id, timeout)
            # The backend goes only after the guest let go of the device.
            if kind == "disk":
                _quiet(mon, "blockdev-del", {"node-name": entry["node"]})
            else:
                _quiet(mon, "netdev_del", {"id": dev_id})
        _record_remove(vm, entry)
    return entry


# ---- the parts -----------------------------------------------------------------------------


def _running(name: str, base: Path | None) -> VM:
    from qlaunch.vm.api import VM

    vm = VM.get(name, base)
    live = vm.live()
    if live.qemu is None:
        raise StateError(f"VM {vm.name} is not running (state {live.state})")
    return vm


def _live_record(vm: VM) -> state.Record:
    live = vm.live()
    if live.qemu is None:
        raise StateError(f"VM {vm.name} is not running (state {live.state})")
    return live.record


def _format_from_name(path: str) -> str:
    # As for profile disks: never guessed from the content, where a raw image could pose as
    # qcow2 with a backing file of the host's choosing.
    for fmt in ("qcow2", "vdi", "vmdk"):
        if path.endswith(f".{fmt}"):
            return fmt
    return "raw"


def _js(obj: dict[str, Any]) -> str:
    return json.dumps(obj, separators=(",", ":"), sort_keys=True)


def _next_id(rec: state.Record, prefix: str) -> str:
    used = {d["id"] for d in rec.hotplug}
    n = 1
    while f"{prefix}{n}" in used:
        n += 1
    return f"{prefix}{n}"


def _board(vm: VM) -> Board:
    from qlaunch.config import profile as profmod

    pj = json.loads((vm.dir / "profile.json").read_text())
    return profmod.build(pj["profile"], name=pj["name"], source=pj["source"]).board


def _free_bus(mon: Monitor, vm: VM, rec: state.Record) -> str | None:
    """Where a new PCI device goes: a free hotplug root port (q35), None for the root bus of
    a conventional PCI machine (pc); UsageError where there is no hotplug at all."""
    from qlaunch.launch.argv import HOTPLUG_PORTS, hotplug_port_ids

    board = _board(vm)
    if board.virtio != "pci":
        raise UsageError(
            f"VM {vm.name}: {board.machine} has no PCI bus, so nothing can be plugged in while "
            "it runs",
            hint="add the disk or NIC to the profile and restart the VM",
        )
    ports = hotplug_port_ids(board)
    if not ports:
        if board.machine == "pc":
            return None
        raise UsageError(
            f"VM {vm.name}: {board.machine} gets no hotplug ports from qlaunch",
            hint="hotplug works on the x86_64 q35 and pc machines",
        )
    busy = {d.get("bus") for d in rec.hotplug}
    present: dict[str, bool] = {}
    for bus in mon.execute("query-pci"):
        for dev in bus.get("devices", []):
            qid = dev.get("qdev_id")
            if qid in ports:
                present[qid] = bool((dev.get("pci_bridge") or {}).get("devices"))
    if not present:
        raise UsageError(
            f"VM {vm.name} was started without hotplug ports",
            hint="restart it with this qlaunch: q35 VMs get "
            f"{HOTPLUG_PORTS} pcie-root-ports for hotplug",
        )
    for p in ports:
        if p in present and not present[p] and p not in busy:
            return p
    raise UsageError(
        f"VM {vm.name}: all {len(present)} hotplug ports are taken",
        hint="detach a hotplugged device first",
    )


def _entry(vm: VM, dev_id: str, kind: str) -> dict[str, Any]:
    rec = _live_record(vm)
    for dev in rec.hotplug:
        if dev["id"] == dev_id:
            if dev["kind"] != kind:
                raise UsageError(f"{dev_id} of VM {vm.name} is a {dev['kind']}, not a {kind}")
            return dict(dev)
    mine = ", ".join(d["id"] for d in rec.hotplug if d["kind"] == kind)
    raise UsageError(
        f"VM {vm.name} has no hotplugged {kind} {dev_id!r}",
        hint=f"hotplugged {kind}s: {mine or 'none'}; devices from the profile stay until the "
        "profile changes",
    )


def _unplug(mon: Monitor, vm: VM, dev_id: str, timeout: float) -> None:
    """device_del and wait for DEVICE_DELETED. A device QEMU no longer has is already
    unplugged (the guest released it while nobody waited)."""
    from qlaunch.vm.qmp import QMPError, QMPTimeout

    try:
        mon.execute("device_del", {"id": dev_id})
    except QMPError as e:
        if e.error_class == "DeviceNotFound":
            return
        if "in the process of unplug" not in e.desc:
            raise
    try:
        mon.wait_event(
            "DEVICE_DELETED", timeout, match=lambda ev: ev.get("data", {}).get("device") == dev_id
        )
    except QMPTimeout:
        raise QemuError(
            f"VM {vm.name}: the guest has not released {dev_id} within {timeout:g} s",
            hint="the guest must cooperate (ACPI or PCIe hotplug); QEMU removes the device "
            "when it does; run the detach again to finish",
        ) from None


def _quiet(mon: Monitor, command: str, args: dict[str, Any]) -> None:
    """Remove a backend that may already be gone (an earlier detach got this far)."""
    from qlaunch.vm.qmp import QMPError

    try:
        mon.execute(command, args)
    except QMPError as e:
        if e.error_class not in ("GenericError", "DeviceNotFound"):
            raise


def _record_add(vm: VM, entry: dict[str, Any]) -> None:
    def ch(r: state.Record) -> None:
        r.hotplug = [*r.hotplug, entry]

    state.update(vm.dir, ch)
    argv = json.loads((vm.dir / "argv.json").read_text())
    state.write_json(vm.dir / "argv.json", [*argv, *entry["args"]])
    where = f" on {entry['bus']}" if entry.get("bus") else ""
    what = entry.get("path") or f"{entry.get('mode')} NIC {entry.get('mac')}"
    state.log(vm.dir, f"hotplug: attached {entry['kind']} {entry['id']} ({what}){where}")


def _record_remove(vm: VM, entry: dict[str, Any]) -> None:
    def ch(r: state.Record) -> None:
        r.hotplug = [d for d in r.hotplug if d["id"] != entry["id"]]

    state.update(vm.dir, ch)
    argv = json.loads((vm.dir / "argv.json").read_text())
    args = entry["args"]
    for i in range(len(argv) - len(args) + 1):
        if argv[i : i + len(args)] == args:
            del argv[i : i + len(args)]
            break
    state.write_json(vm.dir / "argv.json", argv)
    state.log(vm.dir, f"hotplug: detached {entry['kind']} {entry['id']}")
