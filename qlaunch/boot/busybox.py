"""busybox's applets and where `busybox --install -s` would link each, read from the binary.

The guest init used to run `busybox --install -s` at every boot: about 25 ms under TCG on
x86_64 and 100 ms on aarch64, for the same ~270 links each time. The initramfs can carry them
instead. busybox cannot be run here for a foreign architecture, but its tables can be read:
`applet_names` (the sorted names, NUL-separated, starting "[", "[[") and, shortly before it,
`applet_install_loc` (one nibble per applet, the low one first: 0 /, 1 /bin, 2 /sbin, 3 /usr/bin,
4 /usr/sbin). A binary whose tables cannot be found for certain gives None, and the init then
installs the links itself as before.
"""

from __future__ import annotations

from pathlib import Path

DIRS = {0: "", 1: "bin", 2: "sbin", 3: "usr/bin", 4: "usr/sbin"}
# Where every busybox puts these (those that are applets in a given build): the table found
# must agree on all of them.
ANCHORS = {"sh": 1, "ls": 1, "mount": 1, "modprobe": 2, "poweroff": 2, "awk": 3, "env": 3}
SEARCH_BACK = 16 << 10  # the location table sits a few hundred bytes before the names


def applet_links(busybox: Path) -> list[tuple[str, str]] | None:
    """(directory, applet) for each applet, or None when the tables are not found for sure."""
    data = busybox.read_bytes()
    start = data.find(b"\0[\0[[\0")
    if start < 0:
        return None
    start += 1
    names: list[str] = []
    pos = start
    while True:
        end = data.find(b"\0", pos)
        if end < 0 or end == pos or end - pos > 64:
            break
        names.append(data[pos:end].decode("ascii", errors="replace"))
        pos = end + 1
    if not 8 <= len(names) <= 2000 or names != sorted(names) or "sh" not in names:
        return None
    anchors = {names.index(n): loc for n, loc in ANCHORS.items() if n in names}
    size = (len(names) + 1) // 2
    found = [
        off
        for off in range(max(0, start - SEARCH_BACK), start - size + 1)
        if all(_nibble(data, off, i) == loc for i, loc in anchors.items())
        and all(_nibble(data, off, i) in DIRS for i in range(len(names)))
    ]
    if len(found) != 1:
        return None
    return [(DIRS[_nibble(data, found[0], i)], n) for i, n in enumerate(names)]


def _nibble(data: bytes, off: int, i: int) -> int:
    b = data[off + i // 2]
    return b & 0xF if i % 2 == 0 else b >> 4
