"""Guest kernels, modules, DTBs and a static busybox, taken from Debian packages.

Each asset set lives in ``cache_dir()/assets/<set>/`` under version-free names, so that
profiles can name a file without knowing which kernel release was current when it was fetched:

    kernel        the image from the package: vmlinuz, or the ELF vmlinux where the package
                  holds that (ppc64el)
    config        the kernel's config
    modules/      lib/modules/<version>, with modules.dep made by depmod (packages ship none)
    dtbs/         usr/lib/linux-image-<version>/ (empty on x86)
    busybox       static busybox for the set's architecture
    manifest.json set, arch, kernel version, packages and versions, fetched_at, size_bytes

A set is assembled in a temporary directory beside its final place and renamed into place, so a
killed fetch leaves either the old set or the new one, never half of one.
"""

from __future__ import annotations

import fcntl
import functools
import json
import logging
import os
import pwd
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from qlaunch import spawn
from qlaunch.errors import AssetError, UsageError
from qlaunch.paths import cache_dir

log = logging.getLogger(__name__)

MANIFEST_FORMAT = 1

# Package downloads of 50 to 100 MB on a slow mirror; generous, but a stuck apt still ends.
_APT_TIMEOUT = 1800.0
_TOOL_TIMEOUT = 600.0


@dataclass(frozen=True)
class SetSpec:
    """What one asset set is made of."""

    name: str
    arch: str  # qlaunch's name: x86_64, aarch64, arm, i386, ppc64le, s390x, mips64el
    deb_arch: str  # dpkg's name: amd64, arm64, armhf, i386, ppc64el, s390x, mips64el
    metapackage: str  # tracks the current kernel ABI: its one Depends is the real image package
    busybox_package: str
    description: str


ASSET_SETS: dict[str, SetSpec] = {
    s.name: s
    for s in (
        SetSpec(
            "x86_64",
            "x86_64",
            "amd64",
            "linux-image-cloud-amd64",
            "busybox-static",
            "Debian cloud kernel: small and quick to boot under TCG, no 9p",
        ),
        SetSpec(
            "x86_64-generic",
            "x86_64",
            "amd64",
            "linux-image-amd64",
            "busybox-static",
            "Debian generic kernel: slower to boot, has 9p and most drivers",
        ),
        SetSpec(
            "aarch64",
            "aarch64",
            "arm64",
            "linux-image-arm64",
            "busybox-static",
            "Debian arm64 kernel with DTBs (raspi3b among them)",
        ),
        SetSpec(
            "arm",
            "arm",
            "armhf",
            "linux-image-armmp",
            "busybox-static",
            "Debian armmp kernel (ARMv7, no LPAE) with DTBs (vexpress, raspi2b)",
        ),
        SetSpec(
            "i386",
            "i386",
            "i386",
            "linux-image-686",
            "busybox-static",
            "Debian 686 kernel (32-bit x86, no PAE) for the pc and q35 machines",
        ),
        SetSpec(
            "ppc64le",
            "ppc64le",
            "ppc64el",
            "linux-image-powerpc64le",
            "busybox-static",
            "Debian powerpc64le kernel (an ELF vmlinux) for pseries",
        ),
        SetSpec(
            "s390x",
            "s390x",
            "s390x",
            "linux-image-s390x",
            "busybox-static",
            "Debian s390x kernel for s390-ccw-virtio (virtio-ccw)",
        ),
        SetSpec(
            "mips64el",
            "mips64el",
            "mips64el",
            "linux-image-5kc-malta",
            "busybox-static",
            "Debian 5kc-malta kernel (MIPS64r2, an ELF vmlinuz) for malta",
        ),
    )
}


@dataclass(frozen=True)
class AssetSet:
    """A fetched asset set, as found on disk."""

    name: str
    arch: str
    version: str  # kernel release, e.g. 6.1.0-56-cloud-amd64
    root: Path
    kernel: Path
    config: Path
    modules: Path
    dtbs: Path  # always a directory; empty for sets without DTBs
    busybox: Path

    @property
    def manifest(self) -> Path:
        return self.root / "manifest.json"


def arch_of(set_name: str) -> str:
    """The QEMU-side architecture (x86_64, aarch64, ppc64le...) of an asset set."""
    return _spec(set_name).arch


def assets_root() -> Path:
    return cache_dir() / "assets"


def _spec(set_name: str) -> SetSpec:
    try:
        return ASSET_SETS[set_name]
    except KeyError:
        raise UsageError(
            f"unknown asset set {set_name!r}",
            hint="known sets: " + ", ".join(ASSET_SETS),
        ) from None


def _fetch_hint(set_name: str) -> str:
    return f"run: qlaunch assets fetch --arch {set_name}"


def _read_manifest(root: Path) -> dict[str, object] | None:
    try:
        data = json.loads((root / "manifest.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("format") != MANIFEST_FORMAT:
        return None
    return data


def _asset_from(spec: SetSpec, root: Path, manifest: dict[str, object]) -> AssetSet:
    return AssetSet(
        name=spec.name,
        arch=spec.arch,
        version=str(manifest["kernel_version"]),
        root=root,
        kernel=root / "kernel",
        config=root / "config",
        modules=root / "modules",
        dtbs=root / "dtbs",
        busybox=root / "busybox",
    )


def require(set_name: str) -> AssetSet:
    """The fetched asset set, or an AssetError telling how to fetch it. Reads one small file."""
    spec = _spec(set_name)
    root = assets_root() / set_name
    manifest = _read_manifest(root)
    if manifest is None or not (root / "kernel").is_file():
        raise AssetError(f"guest assets for {set_name} are not fetched", hint=_fetch_hint(set_name))
    return _asset_from(spec, root, manifest)


def list_assets() -> list[dict[str, object]]:
    """One row per known set, fetched or not (for `qlaunch assets list`)."""
    rows: list[dict[str, object]] = []
    for spec in ASSET_SETS.values():
        root = assets_root() / spec.name
        manifest = _read_manifest(root)
        rows.append(
            {
                "set": spec.name,
                "arch": spec.arch,
                "version": manifest.get("kernel_version") if manifest else None,
                "path": str(root),
                "size_bytes": manifest.get("size_bytes", 0) if manifest else 0,
                "present": manifest is not None,
                "fetched_at": manifest.get("fetched_at") if manifest else None,
                "description": spec.description,
            }
        )
    return rows


# --- kernel config ------------------------------------------------------------------------


@functools.lru_cache(maxsize=16)
def _parse_config(path: str, _mtime_ns: int, _size: int) -> dict[str, str]:
    options: dict[str, str] = {}
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            if line.startswith("CONFIG_"):
                key, _, value = line.rstrip("\n").partition("=")
                options[key] = value
    return options


def kernel_has(set_or_config_path: str | Path, option: str) -> Literal["y", "m"] | None:
    """Whether a kernel has an option built in ("y"), as a module ("m"), or not at all (None).

    Takes an asset set name or a path to a kernel config; the option with or without CONFIG_.
    """
    if isinstance(set_or_config_path, str) and set_or_config_path in ASSET_SETS:
        path = require(set_or_config_path).config
    else:
        path = Path(set_or_config_path)
    try:
        st = path.stat()
    except OSError as e:
        raise AssetError(f"cannot read kernel config {path}: {e.strerror}") from None
    key = option if option.startswith("CONFIG_") else f"CONFIG_{option}"
    value = _parse_config(str(path), st.st_mtime_ns, st.st_size).get(key)
    if value == "y":
        return "y"
    if value == "m":
        return "m"
    return None


# --- fetching -----------------------------------------------------------------------------

_PREREQ_HINT = (
    "guest kernels come from Debian packages: that needs a Debian or Ubuntu host with apt-get, "
    "apt-cache and dpkg-deb, and depmod (as root: apt-get install kmod)"
)


def _run(argv: list[str], *, cwd: Path | None = None, timeout: float = _TOOL_TIMEOUT) -> str:
    env = dict(os.environ, LC_ALL="C", DEBIAN_FRONTEND="noninteractive")
    try:
        proc = spawn.run(argv, cwd=str(cwd) if cwd else None, env=env, timeout=timeout)
    except FileNotFoundError:
        raise AssetError(f"{argv[0]} is not installed", hint=_PREREQ_HINT) from None
    except subprocess.TimeoutExpired:
        raise AssetError(f"{' '.join(argv)} did not finish within {timeout:.0f} s") from None
    if proc.returncode != 0:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-5:])
        raise AssetError(f"{' '.join(argv)} failed (exit {proc.returncode}): {tail}")
    return proc.stdout


def _check_tools() -> None:
    missing = [t for t in ("apt-get", "apt-cache", "dpkg", "dpkg-deb") if not shutil.which(t)]
    if not shutil.which("depmod") and not Path("/usr/sbin/depmod").exists():
        missing.append("depmod")
    if missing:
        raise AssetError("cannot fetch guest assets: missing " + ", ".join(missing), _PREREQ_HINT)


def _depmod() -> str:
    return shutil.which("depmod") or "/usr/sbin/depmod"


def _ensure_architectures(deb_archs: set[str], progress: Callable[[str], None]) -> None:
    native = _run(["dpkg", "--print-architecture"]).strip()
    known = {native, *_run(["dpkg", "--print-foreign-architectures"]).split()}
    missing = sorted(deb_archs - known)
    if not missing:
        return
    if os.geteuid() != 0:
        cmds = "; ".join(f"dpkg --add-architecture {a}" for a in missing)
        raise AssetError(
            "dpkg does not know architecture " + ", ".join(missing) + " and qlaunch is not root",
            hint=f"as root run: {cmds}; apt-get update",
        )
    for a in missing:
        progress(f"adding dpkg architecture {a}")
        _run(["dpkg", "--add-architecture", a])
    _apt_update(progress)


def _apt_update(progress: Callable[[str], None]) -> None:
    if os.geteuid() != 0:
        raise AssetError(
            "apt has no package lists for the guest kernels and qlaunch is not root",
            hint="as root run: apt-get update",
        )
    progress("running apt-get update")
    _run(["apt-get", "update"], timeout=_APT_TIMEOUT)


def _resolve(specs: list[SetSpec]) -> dict[str, str]:
    """The real image package behind each set's metapackage, in one apt-cache call."""
    argv = ["apt-cache", "depends", "--no-recommends", "--no-suggests", "--no-conflicts"]
    argv += ["--no-breaks", "--no-replaces", "--no-enhances"]
    argv += [f"{s.metapackage}:{s.deb_arch}" for s in specs]
    env = dict(os.environ, LC_ALL="C")
    proc = spawn.run(argv, env=env, timeout=_TOOL_TIMEOUT)
    found: dict[str, str] = {}
    current: str | None = None
    for line in proc.stdout.splitlines():
        if not line.startswith(" "):
            current = line.strip().split(":")[0]
        elif current and line.strip().startswith("Depends:"):
            dep = line.split(":", 1)[1].strip().split(":")[0]
            if dep.startswith("linux-image-") and current not in found:
                found[current] = dep
    return found


def _resolve_all(specs: list[SetSpec], progress: Callable[[str], None]) -> dict[str, str]:
    found = _resolve(specs)
    if any(s.metapackage not in found for s in specs):
        # Usually an architecture added without apt-get update since: refresh once and retry.
        _apt_update(progress)
        found = _resolve(specs)
    missing = [s for s in specs if s.metapackage not in found]
    if missing:
        names = ", ".join(f"{s.metapackage}:{s.deb_arch}" for s in missing)
        raise AssetError(
            f"apt cannot resolve {names}",
            hint="check /etc/apt/sources.list has Debian main for that architecture, then run: "
            "apt-get update",
        )
    return {s.name: found[s.metapackage] for s in specs}


@contextmanager
def _lock(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


def _tree_size(root: Path) -> int:
    total = 0
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            p = os.path.join(dirpath, name)
            if not os.path.islink(p):
                total += os.stat(p).st_size
    return total


def _deb_field(deb: Path, field: str) -> str:
    return _run(["dpkg-deb", "-f", str(deb), field]).strip()


def _download(
    specs: list[SetSpec], images: dict[str, str], debs: Path, progress: Callable[[str], None]
) -> None:
    """Every set's packages in one apt-get call: each apt start reads the package lists of
    every dpkg architecture (with the four foreign ones, about 8 s of CPU), so one per set
    would cost that many times over."""
    _let_apt_write(debs.parent, debs)
    pkgs: list[str] = []
    for spec in specs:
        for pkg in (images[spec.name], spec.busybox_package):
            if f"{pkg}:{spec.deb_arch}" not in pkgs:
                pkgs.append(f"{pkg}:{spec.deb_arch}")
    progress("downloading " + ", ".join(pkgs))
    _run(["apt-get", "download", *pkgs], cwd=debs, timeout=_APT_TIMEOUT)


def _fetch_one(
    spec: SetSpec, image_pkg: str, debs: Path, progress: Callable[[str], None]
) -> AssetSet:
    base = assets_root()
    base.mkdir(parents=True, exist_ok=True)
    final = base / spec.name
    work = Path(tempfile.mkdtemp(prefix=f".fetch-{spec.name}-", dir=base))
    try:
        arch = spec.deb_arch
        image_deb = _one(debs.glob(f"{image_pkg}_*_{arch}.deb"), image_pkg)
        busybox_deb = _one(debs.glob(f"{spec.busybox_package}_*_{arch}.deb"), spec.busybox_package)

        progress(f"{spec.name}: unpacking {image_deb.name}")
        tree = work / "tree"
        _run(["dpkg-deb", "-x", str(image_deb), str(tree)])
        bb_tree = work / "bb"
        _run(["dpkg-deb", "-x", str(busybox_deb), str(bb_tree)])

        versions = [p.name for p in (tree / "lib" / "modules").iterdir() if p.is_dir()]
        if len(versions) != 1:
            raise AssetError(f"{image_deb.name}: expected one lib/modules/<version>, {versions}")
        version = versions[0]

        progress(f"{spec.name}: depmod {version}")
        _run([_depmod(), "-b", str(tree), version])

        stage = work / "set"
        stage.mkdir()
        os.rename(_kernel_image(tree / "boot", version, image_deb.name), stage / "kernel")
        os.rename(tree / "boot" / f"config-{version}", stage / "config")
        os.rename(tree / "lib" / "modules" / version, stage / "modules")
        for link in ("build", "source"):  # point into linux-headers, which we never fetch
            (stage / "modules" / link).unlink(missing_ok=True)
        dtb_src = tree / "usr" / "lib" / f"linux-image-{version}"
        if dtb_src.is_dir():
            os.rename(dtb_src, stage / "dtbs")
        else:
            (stage / "dtbs").mkdir()
        bb = bb_tree / "bin" / "busybox"
        if not bb.is_file():
            raise AssetError(f"{busybox_deb.name} holds no bin/busybox")
        os.rename(bb, stage / "busybox")
        os.chmod(stage / "busybox", 0o755)

        size = _tree_size(stage)
        manifest: dict[str, object] = {
            "format": MANIFEST_FORMAT,
            "set": spec.name,
            "arch": spec.arch,
            "deb_arch": spec.deb_arch,
            "kernel_version": version,
            "metapackage": spec.metapackage,
            "packages": {
                _deb_field(image_deb, "Package"): _deb_field(image_deb, "Version"),
                _deb_field(busybox_deb, "Package"): _deb_field(busybox_deb, "Version"),
            },
            "fetched_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "size_bytes": size,
        }
        (stage / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")

        # Swap in: the old set (if any) moves aside first, so readers see old or new, whole.
        old = work / "old"
        if final.exists():
            os.rename(final, old)
        os.rename(stage, final)
        progress(f"{spec.name}: ready {version} ({size >> 20} MiB)")
        return _asset_from(spec, final, manifest)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _kernel_image(boot: Path, version: str, deb: str) -> Path:
    # ppc64el ships the plain ELF vmlinux (what QEMU's pseries loads); the others a vmlinuz
    # (on mips a self-decompressing ELF, on s390x its own bootable format).
    for name in (f"vmlinuz-{version}", f"vmlinux-{version}"):
        if (boot / name).is_file():
            return boot / name
    raise AssetError(f"{deb} holds no boot/vmlinuz-{version} or boot/vmlinux-{version}")


def _let_apt_write(work: Path, debs: Path) -> None:
    """As root, apt downloads as the user _apt and warns (then works unsandboxed) when that
    user cannot write the target: hand it the download directory, nothing more."""
    if os.geteuid() != 0:
        return
    try:
        uid = pwd.getpwnam("_apt").pw_uid
    except KeyError:
        return
    os.chmod(work, 0o711)
    os.chown(debs, uid, -1)


def _one(paths: Iterator[Path], what: str) -> Path:
    found = sorted(paths)
    if len(found) != 1:
        raise AssetError(f"apt-get download of {what} gave {len(found)} files, expected 1")
    return found[0]


def _print_nothing(_line: str) -> None:
    pass


def fetch(
    set_names: list[str],
    *,
    progress: Callable[[str], None] = _print_nothing,
    force: bool = False,
) -> list[AssetSet]:
    """Fetch asset sets from Debian packages; sets already present are kept as they are.

    Without force no apt query happens for a present set (apt-cache alone costs a second),
    so a warm call only reads manifests. With force each set's metapackage is resolved again
    and the set is fetched anew.
    """
    specs = [_spec(n) for n in dict.fromkeys(set_names)]
    result: dict[str, AssetSet] = {}
    todo: list[SetSpec] = []
    if not force:
        for spec in specs:
            try:
                result[spec.name] = require(spec.name)
                progress(f"{spec.name}: present ({result[spec.name].version})")
            except AssetError:
                todo.append(spec)
    else:
        todo = specs
    if todo:
        _check_tools()
        with _lock(assets_root() / ".lock"):
            # Under the lock any work directory is a leftover of a fetch that was killed.
            for stale in assets_root().glob(".fetch-*"):
                shutil.rmtree(stale, ignore_errors=True)
            # Another qlaunch may have fetched while we waited for the lock.
            if not force:
                still = []
                for spec in todo:
                    try:
                        result[spec.name] = require(spec.name)
                    except AssetError:
                        still.append(spec)
                todo = still
            if todo:
                _ensure_architectures({s.deb_arch for s in todo}, progress)
                progress("resolving " + ", ".join(f"{s.metapackage}:{s.deb_arch}" for s in todo))
                images = _resolve_all(todo, progress)
                work = Path(tempfile.mkdtemp(prefix=".fetch-debs-", dir=assets_root()))
                try:
                    debs = work / "debs"
                    debs.mkdir()
                    _download(todo, images, debs, progress)
                    for spec in todo:
                        result[spec.name] = _fetch_one(spec, images[spec.name], debs, progress)
                finally:
                    shutil.rmtree(work, ignore_errors=True)
    return [result[s.name] for s in specs]
