"""The package's shape, read from its imports: layers, no circles, one way to start a child,
and a parser that does not pay for what a command may never use."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

PKG = Path(__file__).resolve().parents[2] / "qlaunch"

# A folder imports only from folders of a lower rank (or from itself). The roots (errors,
# paths, spawn, units, names) are rank 0; the package's own __init__ and __main__ are its faces.
RANK = {"config": 1, "boot": 2, "storage": 2, "net": 2, "launch": 3, "vm": 4, "testloop": 4}
RANK["cli"] = 5
FACES = {"qlaunch", "qlaunch.__main__"}


def _module(path: Path) -> str:
    parts = list(path.relative_to(PKG.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module(p): p for p in PKG.rglob("*.py")}


def _imports(path: Path) -> set[str]:
    """Every qlaunch module this one imports, at its top or in a function; not the ones
    under `if TYPE_CHECKING:` (they never run)."""
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                continue
            if isinstance(child, ast.Import):
                found.update(a.name for a in child.names)
            elif isinstance(child, ast.ImportFrom) and child.module:
                found.add(child.module)
                found.update(f"{child.module}.{a.name}" for a in child.names)
            visit(child)

    visit(ast.parse(path.read_text()))
    return {n for n in found if n in MODULES}


GRAPH = {
    m: {n for n in _imports(p) if n != m and not m.startswith(n + ".")} for m, p in MODULES.items()
}


def _rank(module: str) -> int:
    parts = module.split(".")
    return RANK.get(parts[1], 0) if len(parts) > 2 or parts[-1] in RANK else 0


def test_layers_import_only_downwards() -> None:
    wrong = []
    for m, targets in GRAPH.items():
        if m in FACES:
            continue
        for n in targets:
            same_folder = m.split(".")[:2] == n.split(".")[:2]
            if not same_folder and _rank(n) > 0 and _rank(n) >= _rank(m):
                wrong.append(f"{m} -> {n}")
    assert not wrong, wrong


def test_no_import_circles() -> None:
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    circles = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in GRAPH[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                circles.append(sorted(comp))

    for v in GRAPH:
        if v not in index:
            visit(v)
    assert not circles, circles


def test_children_start_only_in_the_spawn_module() -> None:
    starters = {"run", "Popen", "call", "check_call", "check_output", "system", "popen"}
    offenders = []
    for m, p in MODULES.items():
        if m == "qlaunch.spawn":
            continue
        for node in ast.walk(ast.parse(p.read_text())):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and isinstance(node.func.value, ast.Name)
                and node.func.value.id in ("subprocess", "os")
                and node.func.attr in starters
            ):
                offenders.append(f"{m}:{node.lineno} {node.func.value.id}.{node.func.attr}")
    assert not offenders, offenders


def test_library_leaves_umask_and_other_loggers_alone() -> None:
    offenders = []
    for m, p in MODULES.items():
        text = p.read_text()
        # The supervisor is a program of its own (python -m qlaunch.vm.supervisor), and the
        # CLI is the application: both may set up their own process.
        if m in ("qlaunch.vm.supervisor", "qlaunch.cli.app"):
            continue
        for bad in ("os.umask(", ".setLevel("):
            if bad in text:
                offenders.append(f"{m}: {bad}")
    assert not offenders, offenders


def test_parser_loads_no_heavy_module() -> None:
    """Building the parser (every command pays for it) imports none of the heavy libraries,
    nor the layers a command loads when it runs."""
    code = (
        "import sys, json; from qlaunch.cli.app import build_parser; build_parser(); "
        "print(json.dumps(sorted(sys.modules)))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    loaded = set(json.loads(out.stdout))
    heavy = {"qemu.qmp", "pyroute2", "psutil", "asyncio", "qlaunch.vm.api", "qlaunch.net.links"}
    heavy |= {"qlaunch.testloop.driver", "qlaunch.boot.initramfs", "qlaunch.launch.plan"}
    assert not heavy & loaded, sorted(heavy & loaded)
    # ...and it does load what it must, so this test would see an import if one crept in.
    assert "qlaunch.cli.commands.core" in loaded
