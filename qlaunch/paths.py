"""Where qlaunch keeps things. Every directory is computed here and nowhere else."""

from __future__ import annotations

import os
from pathlib import Path

SHIPPED_PROFILES = Path(__file__).resolve().parent / "profiles"


def cache_dir() -> Path:
    """Downloaded guest assets and built initramfs images ($QLAUNCH_CACHE overrides)."""
    env = os.environ.get("QLAUNCH_CACHE")
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "qlaunch"


def config_dir() -> Path:
    """User profiles and network definitions ($QLAUNCH_CONFIG overrides)."""
    env = os.environ.get("QLAUNCH_CONFIG")
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_CONFIG_HOME")
    return (Path(xdg) if xdg else Path.home() / ".config") / "qlaunch"


def state_dir() -> Path:
    """Per-VM runtime state: /run/qlaunch as root, $XDG_RUNTIME_DIR/qlaunch otherwise."""
    env = os.environ.get("QLAUNCH_STATE")
    if env:
        return Path(env)
    if os.geteuid() == 0:
        return Path("/run/qlaunch")
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    return (Path(xdg) if xdg else Path("/tmp") / f"qlaunch-{os.getuid()}") / "qlaunch"


def profile_dirs() -> list[Path]:
    """Profile search order: the shipped profiles (package data), then the user's config."""
    return [SHIPPED_PROFILES, config_dir() / "profiles"]


def data_dir() -> Path:
    """What must outlive a reboot: VM definitions for autostart, UEFI variable stores, TPM
    state. /var/lib/qlaunch as root, $XDG_STATE_HOME/qlaunch otherwise ($QLAUNCH_DATA
    overrides). Runtime state (pids, sockets, locks) stays in state_dir(), which is /run."""
    env = os.environ.get("QLAUNCH_DATA")
    if env:
        return Path(env)
    if os.geteuid() == 0:
        return Path("/var/lib/qlaunch")
    xdg = os.environ.get("XDG_STATE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".local" / "state") / "qlaunch"


def vm_data_dir(name: str) -> Path:
    """One VM's persistent data (its name is validated by the caller)."""
    return data_dir() / "vms" / name
