"""README's exit-code tables stay true: every code an error class carries is there with the
words qlaunch.errors gives it, exec's codes are the protocol's, and every command is in a
group."""

from __future__ import annotations

import importlib
import pkgutil
import re
from pathlib import Path

import exitdoc

import qlaunch
from qlaunch import errors
from qlaunch.boot import protocol
from qlaunch.cli.app import build_parser

PACKAGE = Path(qlaunch.__file__).resolve().parent


def all_error_classes() -> set[type[errors.QlaunchError]]:
    for mod in pkgutil.walk_packages(qlaunch.__path__, "qlaunch."):
        if not mod.name.endswith("__main__"):
            importlib.import_module(mod.name)
    found: set[type[errors.QlaunchError]] = set()
    todo: list[type[errors.QlaunchError]] = [errors.QlaunchError]
    while todo:
        cls = todo.pop()
        found.add(cls)
        todo += cls.__subclasses__()
    return found


def test_codes_0_to_5_mean_what_errors_says() -> None:
    doc = exitdoc.meanings()
    for code, words in errors.EXIT_CODES.items():
        assert doc[str(code)] == words, code


def test_every_error_class_has_a_documented_code() -> None:
    classes = all_error_classes()
    assert len(classes) > 8  # the walk found the classes that live outside errors.py too
    doc = exitdoc.meanings()
    for cls in classes:
        assert str(cls.exit_code) in doc, f"{cls.__module__}.{cls.__name__}: {cls.exit_code}"


def test_exit_codes_given_at_raise_sites_are_documented() -> None:
    doc = exitdoc.meanings()
    consts = {k: v for k, v in vars(protocol).items() if k.startswith("EXIT_")}
    for path in PACKAGE.rglob("*.py"):
        for m in re.finditer(r"exit_code=([A-Za-z_0-9.]+)\)?,?\n", path.read_text()):
            value = m.group(1).split(".")[-1]
            code = int(value) if value.isdigit() else consts.get(value)
            if code is None:
                continue  # a variable passed along (e.g. exit_code=exit_code)
            assert str(code) in doc, f"{path}: exit_code={value}"


def test_exec_codes_are_the_protocols() -> None:
    doc = exitdoc.meanings()
    exec_codes = {
        v for k, v in vars(protocol).items() if k.startswith("EXIT_") and isinstance(v, int)
    }
    assert exec_codes == set(range(118, 125))
    assert {str(c) for c in exec_codes} <= set(doc)
    assert {c for c in range(100, 128) if str(c) in doc} == exec_codes
    assert exitdoc.codes_for("exec") >= exec_codes


def test_every_command_is_in_one_group_and_groups_use_known_codes() -> None:
    parser = build_parser()
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    commands = set(sub.choices)
    listed: list[str] = []
    known = {int(c) for c in exitdoc.meanings() if c.isdigit()}
    for group, (cmds, codes, _) in exitdoc.groups().items():
        listed += cmds
        assert codes <= known, group
        assert 2 in codes, f"{group}: every command can be given bad input"
    assert sorted(listed) == sorted(set(listed)), "a command in two groups"
    assert set(listed) == commands


def test_signal_codes_are_documented_as_main_returns_them() -> None:
    import signal

    from qlaunch.cli import app

    doc = exitdoc.meanings()
    assert "128+N" in doc
    text = doc["128+N"]
    for sig, code in ((signal.SIGHUP, 129), (signal.SIGINT, 130), (signal.SIGTERM, 143)):
        assert f"{code} " in text and 128 + sig == code
    src = Path(app.__file__).read_text()
    assert "return 128 + e.signum" in src and "return 130" in src and "return 141" in src
