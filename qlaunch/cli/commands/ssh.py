"""`qlaunch ssh NAME [-- CMD...]`: the system's ssh into a running VM, the way found for you."""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from typing import Any

from qlaunch.cli.argtypes import non_negative, positive
from qlaunch.errors import HostError, StateError

DESCRIPTION = """\
Run the system's ssh into VM NAME: through a user-mode forward to guest port 22, else to
the guest's address on a qlaunch network or host bridge (from its guest agent, else its
DHCP lease), inside the VM's network namespace when it has one.

Key: -i, else the private key (in ~/.ssh or the profile's directory) whose .pub is one of
the profile's [cloud-init] ssh_authorized_keys, else ssh's own choice. Host keys are kept
in the VM's state directory and accepted the first time.

CMD goes to ssh as words, which ssh joins with spaces for the guest's shell, as plain ssh
does: quote what the remote shell must not split. The exit status is ssh's: the command's,
or 255 when ssh itself failed.
"""

EXAMPLES = """\
examples:
  qlaunch ssh web                             a shell (user debian)
  qlaunch ssh web -- uname -a                 one command; its exit status is ssh's
  qlaunch ssh web --wait 120 -- cloud-init status --wait   right after start
  qlaunch ssh web --user root -i ~/.ssh/lab -- 'df -h | head -3'
"""


def register(sub: Any) -> None:
    p = sub.add_parser(
        "ssh",
        help="ssh into a running VM (finds the port forward or address, the key)",
        usage="qlaunch ssh [-h] [--user USER] [-i KEY] [--wait S] [--connect-timeout S] "
        "NAME [-- CMD...]",
        description=DESCRIPTION,
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("name")
    p.add_argument("--user", "-l", default=None, help="the guest user (default: debian)")
    p.add_argument("-i", dest="key", metavar="KEY", help="private key file")
    p.add_argument(
        "--wait",
        type=non_negative(float),
        default=0.0,
        metavar="S",
        help="wait up to S seconds for the guest's address, its sshd and a login that works",
    )
    p.add_argument(
        "--connect-timeout",
        type=positive(int),
        default=10,
        metavar="S",
        help="ssh's ConnectTimeout (10)",
    )
    p.set_defaults(func=cmd_ssh)


def cmd_ssh(args: argparse.Namespace) -> int:
    from qlaunch.net import netns
    from qlaunch.vm import ssh
    from qlaunch.vm.api import VM

    vm = VM.get(args.name)
    if shutil.which("ssh") is None:
        raise HostError("no ssh client here", hint="apt-get install openssh-client")
    user = args.user or ssh.DEFAULT_USER
    key: Any = ssh.check_key(args.key) if args.key else ssh.find_key(vm)
    command = list(args.guest_cmd or [])
    way = _wait(vm, args, user, key) if args.wait > 0 else ssh.find_way(vm)
    argv = ssh.argv(
        vm, way, user=user, key=key, command=command, connect_timeout=args.connect_timeout
    )
    sys.stdout.flush()
    sys.stderr.flush()
    # ssh takes this process's place: its exit status, signals and terminal are the user's.
    with netns.entered(way.netns):
        os.execvp(argv[0], argv)
    return 255  # not reached


def _wait(vm: Any, args: argparse.Namespace, user: str, key: Any) -> Any:
    """Until the address is known, sshd answers with its banner, and a login runs `true`."""
    import subprocess

    from qlaunch import spawn
    from qlaunch.net import netns
    from qlaunch.vm import ssh

    deadline = time.monotonic() + args.wait
    why = "nothing tried yet"
    while True:
        try:
            way = ssh.find_way(vm)
        except StateError as e:
            if not vm.live().alive:
                raise
            why = e.message
        else:
            if ssh.banner(way) is None:
                why = f"no ssh server answers at {way.host} port {way.port} yet"
            else:
                left = max(1, int(min(args.connect_timeout, deadline - time.monotonic())))
                probe = ssh.argv(
                    vm, way, user=user, key=key, command=["true"], batch=True, connect_timeout=left
                )
                try:
                    with netns.entered(way.netns):
                        r = spawn.run(probe, timeout=left + 10)
                except subprocess.TimeoutExpired:
                    why = "ssh hung"
                else:
                    if r.returncode == 0:
                        return way
                    why = (r.stderr.strip().splitlines() or [f"ssh exited {r.returncode}"])[-1]
        if time.monotonic() >= deadline:
            raise StateError(
                f"VM {vm.name}: no ssh login within {args.wait:g} s: {why}",
                hint="the guest may still be booting; `qlaunch log NAME` shows its console",
            )
        # A banner check is one local connection: a short pause costs nothing, where a
        # second's would add half a second on average to every boot-to-login.
        time.sleep(0.25)
