"""`qlaunch image ...` (qemu-img made safe: never overwrites, never shrinks unasked) and `seed`."""

from __future__ import annotations

import argparse
import sys
from typing import IO, Any

from qlaunch import units
from qlaunch.cli import output
from qlaunch.cli.commands.imagebuild import register_build
from qlaunch.errors import UsageError

FORMATS = (
    "qcow2",
    "raw",
    "vdi",
    "vmdk",
)  # as qlaunch.storage.image.FORMATS, without importing it here


def register(sub: Any) -> None:
    p = sub.add_parser(
        "image",
        help="disk images: create, info, convert, resize, check, overlays",
        description="Disk images through qemu-img. Nothing here overwrites an existing file, and "
        "nothing shrinks a disk without --shrink.",
    )
    isub = p.add_subparsers(dest="image_command", metavar="ACTION", required=True)
    register_build(isub)

    c = isub.add_parser("create", help="a new empty image (or an overlay with --backing)")
    c.add_argument("path")
    c.add_argument("size", nargs="?", help="like 8G or 512M (binary units); default: the base's")
    c.add_argument("--format", "-f", default="qcow2", choices=FORMATS)
    c.add_argument("--backing", "-b", metavar="BASE", help="reads fall through to BASE (qcow2)")
    c.set_defaults(func=cmd_create)

    i = isub.add_parser("info", help="format, sizes and the backing chain (works while in use)")
    i.add_argument("path")
    i.add_argument("--json", action="store_true")
    i.set_defaults(func=cmd_info)

    v = isub.add_parser(
        "convert",
        help="copy an image into a new one of another format, flattening its backing chain",
        description="Copy SRC into a new image DST. The copy is written beside DST under a "
        "hidden name and takes DST's name only when complete. Progress goes to stderr: a bar "
        "on a terminal, otherwise a line every 10%%.",
    )
    v.add_argument("src")
    v.add_argument("dst")
    v.add_argument("--format", "-O", required=True, choices=FORMATS, help="DST's format")
    v.add_argument("--source-format", "-f", choices=FORMATS, help="SRC's format (default: probed)")
    v.add_argument("--quiet", "-q", action="store_true", help="no progress")
    v.set_defaults(func=cmd_convert)

    r = isub.add_parser("resize", help="set the virtual size (refuses to shrink without --shrink)")
    r.add_argument("path")
    r.add_argument("size", help="like 16G, or +2G to grow by that much")
    r.add_argument("--shrink", action="store_true", help="allow cutting data off the end")
    r.set_defaults(func=cmd_resize)

    s = isub.add_parser(
        "sd-round",
        help="grow an image to the next power of two, as ARM boards' SD cards need",
    )
    s.add_argument("path")
    s.set_defaults(func=cmd_sd_round)

    k = isub.add_parser(
        "check",
        help="qemu-img check: exit 0 when clean (or a raw image), 1 when not",
    )
    k.add_argument("path")
    k.add_argument("--json", action="store_true")
    k.set_defaults(func=cmd_check)

    o = isub.add_parser("overlay", help="a new qcow2 image on BASE: writes stay in NEW")
    o.add_argument("base")
    o.add_argument("new")
    o.set_defaults(func=cmd_overlay)

    sd = sub.add_parser(
        "seed",
        help="build a cloud-init NoCloud seed ISO (label cidata)",
        description="Write a NoCloud seed ISO: user-data, meta-data (made up when not given: a "
        "content-derived instance-id, local-hostname, public-keys) and network-config.",
    )
    sd.add_argument("out", metavar="OUT.iso")
    sd.add_argument("--user-data", required=True, metavar="FILE")
    sd.add_argument("--meta-data", metavar="FILE")
    sd.add_argument("--network-config", metavar="FILE")
    sd.add_argument("--hostname", help="local-hostname in the made-up meta-data")
    sd.add_argument(
        "--ssh-key",
        action="append",
        default=[],
        metavar="KEY",
        help="a public key for the default user, in the made-up meta-data (repeatable)",
    )
    sd.add_argument(
        "--force",
        action="store_true",
        help="replace OUT.iso even if qlaunch did not write it (never an input, nor a file a "
        "VM holds)",
    )
    sd.set_defaults(func=cmd_seed)


def _not_held(path: str, what: str) -> None:
    """A file a VM holds (a running VM's disk, a saved VM's disk or save file, anything in
    qlaunch's state) is never written, nor created inside its state."""
    from qlaunch.errors import StateError
    from qlaunch.vm import state

    who = state.holder_of(path)
    if who is not None:
        raise StateError(f"{path} is {who}; {what} never writes there")


def _no_guest_cmd(args: argparse.Namespace) -> None:
    if args.guest_cmd is not None:
        raise UsageError(f"`qlaunch {args.command}` takes no command after --")


def cmd_create(args: argparse.Namespace) -> int:
    from qlaunch.storage import image

    _no_guest_cmd(args)
    _not_held(args.path, "image create")
    size = units.parse_size(args.size) if args.size is not None else None
    if size == 0:
        raise UsageError(f"image size {args.size!r} is zero", hint="e.g. 1G or 512M")
    if size is None and args.backing is None:
        raise UsageError(
            "image create needs a SIZE", hint="e.g. qlaunch image create disk.qcow2 8G"
        )
    made = image.create(args.path, size, fmt=args.format, backing=args.backing)
    line = f"created {made.path}: {made.format}, {_size(made.virtual_size)}"
    if made.backing_file:
        line += f", on {made.backing_file} ({made.backing_format})"
    print(line)
    return 0


def cmd_overlay(args: argparse.Namespace) -> int:
    from qlaunch.storage import image

    _no_guest_cmd(args)
    _not_held(args.new, "image overlay")
    made = image.overlay(args.base, args.new)
    print(
        f"created {made.path}: qcow2 overlay on {made.backing_file} ({made.backing_format}), "
        f"{_size(made.virtual_size)}"
    )
    return 0


def _size(n: int) -> str:

    text = units.format_size(n)
    return text if text == str(n) else f"{text} ({n} bytes)"


def _human(n: int | None) -> str:
    if n is None:
        return "unknown"
    for unit, shift in (("G", 30), ("M", 20), ("K", 10)):
        if n >= 1 << shift:
            return f"{n / (1 << shift):.1f}{unit}".replace(".0", "")
    return f"{n}B"


def cmd_info(args: argparse.Namespace) -> int:
    from qlaunch.storage import image

    _no_guest_cmd(args)
    top = image.info(args.path)
    if args.json:
        output.emit_json(top.as_dict())
        return 0
    for depth, node in enumerate(top.chain):
        indent = "  " * depth
        title = "image" if depth == 0 else "backing"
        print(f"{indent}{title}: {node.path}")
        print(f"{indent}  format: {node.format}")
        print(f"{indent}  virtual size: {_size(node.virtual_size)}")
        print(f"{indent}  disk size: {_human(node.actual_size)}")
        if node.cluster_size:
            print(f"{indent}  cluster size: {node.cluster_size}")
        if node.dirty:
            print(f"{indent}  dirty: yes (not closed cleanly; run qlaunch image check)")
        if node.corrupt:
            print(f"{indent}  CORRUPT: QEMU marked it corrupt; run qlaunch image check")
    return 0


class Progress:
    """Percentages from a conversion, drawn for a person or logged for a pipe.

    On a terminal: one bar redrawn in place. Otherwise a line at each 10% step, so a log shows
    the job moving without a line per update.
    """

    WIDTH = 30

    def __init__(self, stream: IO[str], label: str, *, tty: bool) -> None:
        self.stream = stream
        self.label = label
        self.tty = tty
        self._next_step = 0
        self._drawn = False

    def __call__(self, pct: float) -> None:
        if self.tty:
            filled = int(self.WIDTH * pct / 100)
            bar = "#" * filled + "-" * (self.WIDTH - filled)
            self.stream.write(f"\r{self.label} [{bar}] {pct:5.1f}%")
            self._drawn = True
        else:
            if pct < self._next_step:
                return
            step = int(pct // 10) * 10
            self.stream.write(f"qlaunch: {self.label}: {step}%\n")
            self._next_step = step + 10
        self.stream.flush()

    def end(self) -> None:
        if self._drawn:
            self.stream.write("\n")
            self.stream.flush()
            self._drawn = False


def cmd_convert(args: argparse.Namespace) -> int:
    from qlaunch.storage import image

    _no_guest_cmd(args)
    _not_held(args.dst, "image convert")
    progress = None
    if not args.quiet:
        progress = Progress(sys.stderr, f"converting to {args.format}", tty=sys.stderr.isatty())
    try:
        image.convert(
            args.src, args.dst, args.format, progress=progress, src_fmt=args.source_format
        )
    finally:
        if progress:
            # An error message must not land on the end of the bar.
            progress.end()
    return 0


def cmd_resize(args: argparse.Namespace) -> int:
    from qlaunch.storage import image

    _no_guest_cmd(args)
    _not_held(args.path, "image resize")
    text = args.size.strip()
    before = image.info(args.path).virtual_size
    # "+2G" grows by that much; a bare size is the new size.
    grow = text.startswith("+")
    size = units.parse_size(text[1:] if grow else text) + (before if grow else 0)
    after = image.resize(args.path, size, shrink=args.shrink)
    print(f"{args.path}: {_size(before)} -> {_size(after.virtual_size)}")
    return 0


def cmd_sd_round(args: argparse.Namespace) -> int:
    from qlaunch.storage import image

    _no_guest_cmd(args)
    _not_held(args.path, "image sd-round")
    before = image.info(args.path).virtual_size
    if units.is_power_of_two(before):
        print(f"{args.path}: {_size(before)} is already a power of two; unchanged")
        return 0
    after = image.resize_to_pow2(args.path).virtual_size
    print(
        f"{args.path}: {_size(before)} -> {_size(after)} "
        "(grown to the next power of two, as an SD card image must be)"
    )
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    from qlaunch.storage import image

    _no_guest_cmd(args)
    r = image.check(args.path)
    if args.json:
        output.emit_json(r.as_dict())
    elif not r.supported:
        print(f"{args.path}: nothing to check ({r.message})")
    elif r.clean:
        print(f"{args.path}: clean ({r.format})")
    else:
        parts = []
        if r.corruptions:
            parts.append(f"{r.corruptions} corruption(s)")
        if r.leaks:
            parts.append(f"{r.leaks} leaked cluster(s)")
        if r.check_errors:
            parts.append(f"{r.check_errors} error(s) while checking")
        print(f"{args.path}: {r.status}: {', '.join(parts)}")
        if r.leaks and not r.corruptions:
            # Leaks waste space but lose nothing; qemu-img repairs them safely.
            print(f"  leaks are harmless; to reclaim them: qemu-img check -r leaks {args.path}")
    return 0 if r.clean or not r.supported else 1


def cmd_seed(args: argparse.Namespace) -> int:
    import os

    from qlaunch.boot import seed
    from qlaunch.errors import StateError
    from qlaunch.storage import outfile
    from qlaunch.vm import state

    _no_guest_cmd(args)
    inputs = {
        "--user-data": args.user_data,
        "--meta-data": args.meta_data,
        "--network-config": args.network_config,
    }
    for flag, path in inputs.items():
        if path is not None:
            outfile.require_file(path, flag)
    seed.check_keys(args.ssh_key)
    out_real = os.path.realpath(args.out)
    for flag, path in inputs.items():
        if path is not None and os.path.realpath(path) == out_real:
            raise UsageError(f"OUT {args.out} is also the {flag} file; the seed would replace it")
    who = state.holder_of(args.out)
    if who is not None:
        raise StateError(f"{args.out} is {who}; a seed never replaces it")
    outfile.check_target(args.out, "seed", force=args.force, ours=seed.is_seed_iso)

    def read(flag: str, path: str | None) -> bytes | None:
        if path is None:
            return None
        try:
            with open(path, "rb") as f:
                return f.read()
        except OSError as e:
            raise UsageError(f"{flag} {path}: {e.strerror}") from None

    user_data = read("--user-data", args.user_data)
    assert user_data is not None
    meta = read("--meta-data", args.meta_data)
    if meta is not None and (args.hostname or args.ssh_key):
        raise UsageError(
            "--hostname and --ssh-key make up a meta-data, so they cannot go with --meta-data",
            hint="put local-hostname and public-keys in the meta-data file",
        )
    network = read("--network-config", args.network_config)
    out = seed.build_seed(
        args.out,
        user_data=user_data,
        meta_data=meta,
        network_config=network,
        hostname=args.hostname,
        public_keys=args.ssh_key,
    )
    outfile.remember(out)
    files = "user-data, meta-data" + (", network-config" if network is not None else "")
    print(f"wrote {out}: {files} (label {seed.VOLUME_ID})")
    return 0
