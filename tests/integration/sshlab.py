"""Remote hosts on one machine: each a network namespace with its own sshd, its own qlaunch
state, data and config directories (sshd's SetEnv), and its own mount namespace, in which
directories of the lab can be that host's own (a bind mount: the same path, other files).

    with Lab() as lab:
        a = lab.host("a", binds={"images": "a-images"})
        b = lab.host("b", binds={"images": "b-images"})
        lab.link(a, b)              # a veth pair between them: a reaches b at b.uri_from(a)
        qlaunch(["--connect", a.uri, "list"])

Addresses come from 198.18.0.0/15 (RFC 2544's benchmarking range), on veth pairs between the
root namespace and each host (and between two hosts that are linked); nothing is routed. Each
sshd accepts one key, generated for the lab, and no password; its host key is in the lab's
known_hosts. The remote user's ~/.bashrc is masked (bound to /dev/null in the host's mount
namespace): this machine's root shell runs pyenv's set-up there, which costs a remote command
~0.4 s that a plain host does not pay. Teardown ends every process in the namespaces (sshd,
its sessions, the masters' peers, supervisors and QEMUs started there) by namespace only.
"""

from __future__ import annotations

import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from qlaunch.vm import state

VENV_QLAUNCH = str(Path(sys.executable).parent / "qlaunch")
SSHD = "/usr/sbin/sshd"


TICK = re.compile(rb"tick-(\d+)-end\r?\n")
COUNTER = "(i=0; while :; do i=$((i+1)); echo tick-$i-end; sleep 1; done) &"


def ql(*args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run([VENV_QLAUNCH, *args], capture_output=True, text=True, timeout=timeout)


def error_line(r: subprocess.CompletedProcess[str]) -> str:
    lines = r.stderr.strip().splitlines()
    assert lines and lines[-1].startswith("qlaunch: error: "), r.stderr
    assert "Traceback" not in r.stderr
    return lines[-1]


def nothing_of(host: Host, name: str) -> None:
    """No trace of VM name on host: no state directory, no persistent data."""
    assert not (host.state / name).exists(), sorted(p.name for p in host.state.iterdir())
    assert not (host.data / "vms" / name).exists()


def sh(*args: str) -> str:
    return subprocess.run(list(args), check=True, capture_output=True, text=True).stdout


@dataclass
class Host:
    lab: Lab
    label: str
    ns: str
    address: str  # as the root namespace reaches it
    dir: Path
    peers: dict[str, str] = field(default_factory=dict)  # label -> this host's address there
    sshd: subprocess.Popen[bytes] | None = None

    @property
    def state(self) -> Path:
        return self.dir / "state"

    @property
    def data(self) -> Path:
        return self.dir / "data"

    def uri_at(self, address: str, command: str | None = VENV_QLAUNCH, **extra: str) -> str:
        q = {"keyfile": str(self.lab.key), "known_hosts": str(self.lab.known_hosts)}
        if command is not None:
            q["command"] = command
        q.update(extra)
        return f"ssh://root@{address}?" + "&".join(f"{k}={v}" for k, v in q.items())

    @property
    def uri(self) -> str:
        """How the root namespace (the tests) reaches it, running the venv's qlaunch."""
        return self.uri_at(self.address)

    def uri_from(self, other: Host) -> str:
        """How host `other` reaches this one (they must be linked)."""
        return self.uri_at(self.peers[other.label])


class Lab:
    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="qlrm-", dir="/tmp"))
        self.tag = os.urandom(2).hex()
        self.net = random.randrange(0, 256)  # 198.18.NET.0/24 (or 198.19 when taken)
        self.hosts: list[Host] = []
        self.key = self.root / "id"
        self.known_hosts = self.root / "known_hosts"
        self.authorized = self.root / "authorized_keys"
        self._n = 0

    def __enter__(self) -> Lab:
        try:
            sh("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(self.key))
            shutil.copy(f"{self.key}.pub", self.authorized)
            self.known_hosts.touch()
            Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd's privilege separation
            taken = sh("ip", "-o", "-4", "addr")
            while f"198.18.{self.net}." in taken:
                self.net = random.randrange(0, 256)
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _pair(self) -> tuple[str, str]:
        """Two addresses of a fresh /30."""
        base = 4 * self._n
        self._n += 1
        assert base < 252, "too many links for one lab"
        return f"198.18.{self.net}.{base + 1}", f"198.18.{self.net}.{base + 2}"

    def host(self, label: str, binds: dict[str, str] | None = None) -> Host:
        """A host reachable from here at its address; binds: lab directories (relative to
        the lab's root) that are other lab directories on that host."""
        ns = f"qlrm-{self.tag}-{label}"
        d = self.root / label
        for sub in ("state", "data", "config"):
            (d / sub).mkdir(parents=True)
        sh("ip", "netns", "add", ns)
        here, there = self._pair()
        h = Host(self, label, ns, there, d)
        self.hosts.append(h)
        outside = f"qr{self.tag}{label}"[:15]
        sh("ip", "link", "add", outside, "type", "veth", "peer", "name", "eth0", "netns", ns)
        sh("ip", "addr", "add", f"{here}/30", "dev", outside)
        sh("ip", "link", "set", outside, "up")
        sh("ip", "-n", ns, "addr", "add", f"{there}/30", "dev", "eth0")
        sh("ip", "-n", ns, "link", "set", "eth0", "up")
        sh("ip", "-n", ns, "link", "set", "lo", "up")
        key = d / "ssh_host_ed25519_key"
        sh("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key))
        self._known(there, key)
        env = {
            "QLAUNCH_STATE": d / "state",
            "QLAUNCH_DATA": d / "data",
            "QLAUNCH_CONFIG": d / "config",
            "QLAUNCH_CACHE": os.environ.get("QLAUNCH_CACHE") or Path.home() / ".cache/qlaunch",
        }
        config = d / "sshd_config"
        config.write_text(
            "\n".join(
                [
                    f"HostKey {key}",
                    f"AuthorizedKeysFile {self.authorized}",
                    f"PidFile {d / 'sshd.pid'}",
                    "StrictModes no",
                    "UsePAM no",
                    "PermitRootLogin prohibit-password",
                    "PasswordAuthentication no",
                    "KbdInteractiveAuthentication no",
                    "AllowStreamLocalForwarding yes",
                    "MaxSessions 64",
                    "SetEnv " + " ".join(f"{k}={v}" for k, v in env.items()),
                    "",
                ]
            )
        )
        mounts = ['[ -f "$HOME/.bashrc" ] && mount --bind /dev/null "$HOME/.bashrc"']
        for target, source in (binds or {}).items():
            (self.root / target).mkdir(exist_ok=True)
            (self.root / source).mkdir(exist_ok=True)
            mounts.append(f"mount --bind {self.root / source} {self.root / target}")
        script = "; ".join([*mounts, f"exec {SSHD} -D -f {config} -E {d / 'sshd.log'}"])
        h.sshd = subprocess.Popen(
            [
                "ip",
                "netns",
                "exec",
                ns,
                "unshare",
                "-m",
                "--propagation",
                "private",
                "sh",
                "-c",
                script,
            ],
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        self._wait_listening(h, there)
        return h

    def link(self, a: Host, b: Host) -> None:
        """A veth pair between a and b: each reaches the other at its address on it."""
        ia, ib = self._pair()
        name_a, name_b = (
            f"qr{self.tag}{a.label}{b.label}"[:15],
            f"qr{self.tag}{b.label}{a.label}"[:15],
        )
        sh(
            "ip",
            "-n",
            a.ns,
            "link",
            "add",
            name_a,
            "type",
            "veth",
            "peer",
            "name",
            name_b,
            "netns",
            b.ns,
        )
        sh("ip", "-n", a.ns, "addr", "add", f"{ia}/30", "dev", name_a)
        sh("ip", "-n", b.ns, "addr", "add", f"{ib}/30", "dev", name_b)
        sh("ip", "-n", a.ns, "link", "set", name_a, "up")
        sh("ip", "-n", b.ns, "link", "set", name_b, "up")
        a.peers[b.label], b.peers[a.label] = ia, ib
        self._known(ia, a.dir / "ssh_host_ed25519_key")
        self._known(ib, b.dir / "ssh_host_ed25519_key")

    def _known(self, address: str, key: Path) -> None:
        pub = Path(f"{key}.pub").read_text().split()[:2]
        with self.known_hosts.open("a") as f:
            f.write(f"{address} {' '.join(pub)}\n")

    def _wait_listening(self, h: Host, address: str) -> None:
        import socket

        deadline = time.monotonic() + 20
        while True:
            s = socket.socket()
            s.settimeout(1)
            try:
                s.connect((address, 22))
                return
            except OSError:
                assert h.sshd is not None
                if h.sshd.poll() is not None or time.monotonic() > deadline:
                    log = (h.dir / "sshd.log").read_text() if (h.dir / "sshd.log").exists() else ""
                    raise AssertionError(f"sshd of {h.label} did not start: {log}") from None
                time.sleep(0.05)
            finally:
                s.close()

    def close(self) -> None:
        for h in self.hosts:
            reap(h.state)
            kill_in(h.ns)
            if h.sshd is not None:
                h.sshd.wait(10)
            subprocess.run(["ip", "netns", "del", h.ns], capture_output=True)
        shutil.rmtree(self.root, ignore_errors=True)


def reap(root: Path) -> None:
    """End every supervisor and QEMU recorded under root, by identity."""
    for name in state.names(root):
        d = root / name
        try:
            rec = state.read_record(d)
        except Exception:
            continue
        if rec.supervisor is not None:
            state.signal_identified(rec.supervisor, state.supervisor_marker(d), signal.SIGKILL)
        if rec.qemu is not None:
            state.signal_identified(rec.qemu, state.qemu_marker(rec.uuid), signal.SIGKILL)
            state.wait_gone(rec.qemu.pid, rec.qemu.start_ticks, 10.0)


def kill_in(ns: str) -> None:
    """SIGKILL every process in network namespace ns (found by the namespace's inode)."""
    try:
        inode = os.stat(f"/run/netns/{ns}").st_ino
    except FileNotFoundError:
        return
    for _ in range(3):
        found = False
        for p in psutil.process_iter():
            try:
                if os.stat(f"/proc/{p.pid}/ns/net").st_ino == inode:
                    found = True
                    p.kill()
            except (OSError, psutil.Error):
                continue
        if not found:
            return
        time.sleep(0.2)


def close_masters(state_root: Path) -> None:
    """End the ssh master connections a qlaunch with this state root made."""
    d = state_root / ".ssh"
    if not d.is_dir():
        return
    for sock in d.iterdir():
        if sock.is_socket():
            subprocess.run(
                ["ssh", "-o", f"ControlPath={sock}", "-O", "exit", "x"],
                capture_output=True,
                timeout=10,
            )
