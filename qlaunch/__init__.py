"""qlaunch: a low-level QEMU launcher for Linux."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from qlaunch.remote.host import Host
    from qlaunch.testloop.driver import ExecSpec, Result
    from qlaunch.testloop.driver import exec as exec  # noqa: A004

__all__ = ["ExecSpec", "Host", "Result", "__version__", "exec"]


def __getattr__(name: str) -> Any:
    # `import qlaunch` stays cheap (the CLI imports it for every command); the test loop's
    # API loads on first use: qlaunch.exec(...), qlaunch.Result.
    if name in ("exec", "Result", "ExecSpec"):
        from qlaunch.testloop import driver as testloop

        return getattr(testloop, name)
    if name == "Host":
        # Another host's VMs over ssh: qlaunch.Host("ssh://root@web1").
        from qlaunch.remote.host import Host

        return Host
    raise AttributeError(f"module 'qlaunch' has no attribute {name!r}")
