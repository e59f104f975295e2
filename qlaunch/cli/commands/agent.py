"""`qlaunch agent NAME COMMAND [JSON-ARGS]`: one QEMU guest agent command, its answer as JSON."""

from __future__ import annotations

import argparse
import json
from typing import Any

from qlaunch.cli import output
from qlaunch.cli.argtypes import positive
from qlaunch.errors import UsageError

DESCRIPTION = """\
Run one command of the QEMU guest agent (qemu-ga) in VM NAME; JSON-ARGS is a JSON object
of arguments. Timeouts by command: 5 s for queries (guest-ping, guest-info,
guest-network-get-interfaces...), 120 s for fsfreeze and fstrim, 30 s for the rest.
guest-shutdown has no answer: it prints {} once sent. Exit 5 when no agent answers (none
installed in the guest, or it is still booting), 1 when the agent refuses the command, 2
for a command or arguments it does not know.
"""

EXAMPLES = """\
examples:
  qlaunch agent web guest-ping                       {} when the agent answers; exit 5 if none
  qlaunch agent web guest-info                       its version and commands
  qlaunch agent web guest-network-get-interfaces
  qlaunch agent web guest-exec '{"path": "/bin/df", "capture-output": true}'
  qlaunch agent web guest-exec-status '{"pid": 1234}'
  qlaunch agent web guest-shutdown '{"mode": "reboot"}'
"""


def register(sub: Any) -> None:
    p = sub.add_parser(
        "agent",
        help="run one QEMU guest agent command; prints its answer as JSON",
        description=DESCRIPTION,
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("name")
    p.add_argument("agent_command", metavar="COMMAND")
    p.add_argument("args", nargs="?", metavar="JSON-ARGS", help="JSON object of arguments")
    p.add_argument("--timeout", type=positive(float), help="seconds to wait for the answer")
    p.set_defaults(func=cmd_agent)


def cmd_agent(args: argparse.Namespace) -> int:
    from qlaunch.vm import agent
    from qlaunch.vm.api import VM

    if args.guest_cmd is not None:
        raise UsageError("`qlaunch agent` takes no command after --")
    qargs: dict[str, Any] = {}
    if args.args:
        try:
            qargs = json.loads(args.args)
        except ValueError as e:
            raise UsageError(f"JSON-ARGS is not JSON: {e}") from None
        if not isinstance(qargs, dict):
            raise UsageError('JSON-ARGS must be a JSON object, e.g. \'{"mode": "reboot"}\'')
    vm = VM.get(args.name)
    connect = min(args.timeout, agent.CONNECT) if args.timeout else agent.CONNECT
    with agent.connect(vm, connect, purpose=f"agent {args.agent_command}") as ga:
        if args.agent_command == "guest-shutdown":
            ga.shutdown(str(qargs.get("mode", "powerdown")))
            reply: Any = {}
        else:
            reply = ga.execute(args.agent_command, qargs or None, timeout=args.timeout)
    output.emit_json(reply)
    return 0
