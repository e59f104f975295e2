"""Identities derived from names: the MAC address of a VM's NIC.

A MAC is a function of the VM's name and the NIC's index, so a VM keeps its addresses (and its
DHCP leases) across restarts, saves and restores, without storing them anywhere.
"""

from __future__ import annotations

import hashlib


def stable_mac(vm_name: str, index: int) -> str:
    """52:54:00:xx:xx:xx (QEMU's locally administered prefix), the same on every start."""
    h = hashlib.sha256(f"{vm_name}/{index}".encode()).digest()
    return "52:54:00:{:02x}:{:02x}:{:02x}".format(*h[:3])
