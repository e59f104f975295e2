"""Helpers for the networking tests: namespaces they make and delete, and VMs on them.

Every namespace is made by the test and deleted by its finalizer, after every process of ours
in it (dnsmasq, QEMU) has been ended, so no test touches the host's interfaces or leaves a
namespace behind, also when it fails.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from qlaunch.boot import assets, initramfs
from qlaunch.config import profile
from qlaunch.launch import argv as argvmod
from qlaunch.launch import host
from qlaunch.net import attach, links, netns
from qlaunch.spawn import spawn, stop_child


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


def kill_ours_in(ns: str, state: Path) -> None:
    """End the processes in namespace NS whose command line names this test's state directory
    (dnsmasq), and every QEMU in it."""
    inode = os.stat(f"/run/netns/{ns}").st_ino
    needle = str(state)
    for p in psutil.process_iter(["cmdline"]):
        try:
            if os.stat(f"/proc/{p.pid}/ns/net").st_ino != inode:
                continue
        except OSError:
            continue
        argv = p.info["cmdline"] or []
        if any(needle in a for a in argv) or (argv and "qemu-system" in argv[0]):
            with suppress(psutil.NoSuchProcess):
                p.kill()


@contextmanager
def namespace(prefix: str, state: Path) -> Iterator[str]:
    name = f"{prefix}-{uuid.uuid4().hex[:6]}"
    ip("netns", "add", name)
    try:
        ip("-n", name, "link", "set", "lo", "up")
        yield name
    finally:
        kill_ours_in(name, state)
        subprocess.run(["ip", "netns", "del", name], capture_output=True)


@dataclass
class Upstream:
    """A host beyond the VM namespace: its own namespace, a veth pair, and a TCP server that
    answers each connection with the address it sees and remembers it."""

    ns: str
    address: str = "198.51.100.2"
    port: int = 7777
    seen: list[str] = field(default_factory=list)
    _sock: socket.socket | None = None

    def serve(self) -> None:
        with netns.entered(self.ns):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((self.address, self.port))
        s.listen(8)
        self._sock = s
        threading.Thread(target=self._loop, daemon=True).start()

    def _loop(self) -> None:
        assert self._sock is not None
        while True:
            try:
                conn, (peer, _) = self._sock.accept()
            except OSError:
                return
            self.seen.append(peer)
            with conn:
                conn.sendall(f"HTTP/1.0 200 OK\r\n\r\nseen-as {peer}\n".encode())

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()


@contextmanager
def upstream_of(vm_ns: str, state: Path, route_back: str | None = None) -> Iterator[Upstream]:
    """198.51.100.1 (in vm_ns, "up0") <-> 198.51.100.2 (upstream, "dn0")."""
    with namespace("qlu", state) as up_ns:
        with netns.entered(vm_ns), links.iproute() as ipr:
            links.make_veth(ipr, "up0", "dn0", peer_netns=up_ns)
            links.up(ipr, "up0", "198.51.100.1")
        with netns.entered(up_ns), links.iproute() as ipr:
            links.up(ipr, "dn0", "198.51.100.2")
            if route_back:
                ipr.route("add", dst=route_back, gateway="198.51.100.1")
        u = Upstream(up_ns)
        u.serve()
        try:
            yield u
        finally:
            u.close()


@dataclass
class Guest:
    name: str
    proc: subprocess.Popen[bytes]
    log: Path
    nics: attach.PreparedNics

    def console(self) -> str:
        return self.log.read_text(errors="replace")

    def wait(self, timeout: float = 120) -> str:
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            stop_child(self.proc, 1)
            raise AssertionError(f"{self.name} did not finish:\n{self.console()[-3000:]}") from None
        return self.console()

    def kill9(self) -> None:
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait()


def boot(
    name: str,
    ns: str,
    workdir: Path,
    sets: list[str],
    cmd: str | None,
) -> Guest:
    """The default profile with SETS, on namespace NS, running CMD (sh -c) or `sleep 600`.
    QEMU runs in the namespace and gets its taps as fds, as `qlaunch start --netns` does."""
    prof = profile.load("default", sets)
    aset = assets.require("x86_64")
    base = initramfs.build_initramfs(aset)
    initrd = initramfs.initrd_with_command(
        base, ["sh", "-c", cmd or "sleep 600"], workdir / f"{name}.cpio.gz"
    )
    nics = attach.prepare_nics(prof, name, ns)
    try:
        rt = argvmod.Runtime(
            name=name,
            kernel=str(aset.kernel),
            initrd=str(initrd),
            taps=nics.taps,
            append_extra=nics.append,
        )
        argv = argvmod.build_argv(prof, host.probe(), rt)
        log = workdir / f"{name}.console"
        with open(log, "wb") as out, netns.entered(ns):
            proc = spawn(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                pass_fds=nics.fds,
            )
    except BaseException:
        nics.rollback()
        raise
    nics.close_fds()
    return Guest(name, proc, log, nics)


def nft_rules(ns: str) -> list[str]:
    """The rules of qlaunch's table (`inet qlaunch`) in namespace NS as `CHAIN: RULE` lines;
    [] when there is no table. Any other nft failure fails the test: a leak check that cannot
    look must not pass."""
    r = subprocess.run(
        ["ip", "netns", "exec", ns, "nft", "list", "table", "inet", "qlaunch"],
        capture_output=True,
        text=True,
    )
    if r.returncode != 0:
        assert "No such file or directory" in r.stderr, r.stderr
        return []
    chain, out = "", []
    for line in r.stdout.splitlines():
        t = line.strip()
        if t.startswith("chain "):
            chain = t.split()[1]
        elif t and t != "}" and not t.startswith(("table ", "type ")):
            out.append(f"{chain}: {t}")
    return out


def rules_naming(ns: str, *ifnames: str) -> list[str]:
    """The rules of qlaunch's table in NS that match on one of these interfaces (a network's
    bridge or uplink: rules name those, never a VM's tap)."""
    return [r for r in nft_rules(ns) if any(f'"{n}"' in r for n in ifnames)]


def wait_until(predicate, timeout: float, what: str):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)
