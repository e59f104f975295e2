"""qlaunch: a low-level QEMU launcher for Linux."""

__version__ = "0.1.0"
