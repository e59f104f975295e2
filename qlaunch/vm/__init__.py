"""Background VMs: state, supervisor, QMP, stop, snapshots, hotplug, migration.

`from qlaunch.vm import VM, list_vms` is the Python API (qlaunch.vm.api). It loads on first
use, so the supervisor (`python -S -m qlaunch.vm.supervisor`) imports only what it needs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from qlaunch.vm.api import VM, list_vms

__all__ = ["VM", "list_vms"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from qlaunch.vm import api

        return getattr(api, name)
    raise AttributeError(f"module 'qlaunch.vm' has no attribute {name!r}")
