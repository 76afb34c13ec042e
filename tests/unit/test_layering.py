"""The packages keep to their rooms (ARCHITECTURE.md): an import across a wall fails here.

Every module is parsed (never imported), and every import counts: top-level, inside a
function, under `if TYPE_CHECKING:`, and `importlib.import_module("...")` with a literal name.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PROJECT = ("lbstore", "lbqemu", "lbfuse", "lbrestore", "lbguest")
ALLOWED: dict[str, frozenset[str]] = {
    "lbstore": frozenset(),
    "lbqemu": frozenset(),
    "lbfuse": frozenset({"lbstore", "lbguest"}),
    "lbguest": frozenset({"lbstore"}),
}
"""Which other project packages each package may import (lbrestore, the application, any)."""


def imported_modules(source: str, module: str) -> Iterator[tuple[int, str]]:
    """(line, absolute module name) of every import in `source`, the code of `module`."""
    package = module.split(".")
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level]
                yield node.lineno, ".".join([*base, *([node.module] if node.module else [])])
            else:
                yield node.lineno, node.module or ""
        elif isinstance(node, ast.Call) and (name := _dynamic_import(node)) is not None:
            yield node.lineno, name


def _dynamic_import(call: ast.Call) -> str | None:
    """ "x" of `importlib.import_module("x")`, `import_module("x")` or `__import__("x")`."""
    if not call.args or not isinstance(call.args[0], ast.Constant):
        return None
    func = call.func
    named = isinstance(func, ast.Name) and func.id in ("__import__", "import_module")
    if named or (isinstance(func, ast.Attribute) and func.attr == "import_module"):
        return str(call.args[0].value)
    return None


def violations(root: Path, package: str) -> list[str]:
    """Every import in `package` (a folder under `root`) of a project package it must not use."""
    found = []
    for path in sorted((root / package).rglob("*.py")):
        relative = path.relative_to(root).with_suffix("")
        module = ".".join(relative.parts).removesuffix(".__init__")
        for line, name in imported_modules(path.read_text(encoding="utf-8"), module):
            top = name.split(".")[0]
            if top in PROJECT and top != package and top not in ALLOWED[package]:
                found.append(f"{path.relative_to(root)}:{line} imports {name}")
    return found


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_package_imports_only_what_its_room_allows(package: str) -> None:
    if not (ROOT / package).is_dir():
        pytest.skip(f"no {package} package in this tree")
    assert list((ROOT / package).rglob("*.py")), f"{package} has no modules"
    assert violations(ROOT, package) == []


def test_every_kind_of_forbidden_import_is_found(tmp_path: Path) -> None:
    """The checker itself: each way of importing across a wall is caught, allowed ones are not."""
    pkg = tmp_path / "lbfuse"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "ok.py").write_text(
        "import os\nfrom lbstore.view import ChainView\nfrom . import sub\nfrom .sub import x\n"
    )
    (pkg / "sub" / "__init__.py").write_text("from .. import ok\n")
    (pkg / "top.py").write_text("import lbrestore.cli\n")
    (pkg / "late.py").write_text(
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    from lbqemu.qmp import QmpSession\n"
        "def f():\n    from lbrestore import tree\n"
    )
    (pkg / "dynamic.py").write_text(
        "import importlib\ndef g():\n    return importlib.import_module('lbrestore.mount')\n"
    )
    assert violations(tmp_path, "lbfuse") == [
        "lbfuse/dynamic.py:3 imports lbrestore.mount",
        "lbfuse/late.py:3 imports lbqemu.qmp",
        "lbfuse/late.py:5 imports lbrestore",
        "lbfuse/top.py:1 imports lbrestore.cli",
    ]
