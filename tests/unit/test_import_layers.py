"""The import direction of the packages: gateway -> budgets and facilitator -> storage, and devtools
above them all. A lower layer never imports a higher one, and budgets and facilitator never import
each other. Every import statement counts, those inside functions too (a lazy import is still a
dependency), with one exception: a product package may import devtools inside a function (the dev
subcommands of its command line), never at module level, so importing the product never loads
the dev tooling. devtools may import anything."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

# package -> the packages it must not import (anywhere)
FORBIDDEN = {
    "storage": {"facilitator", "budgets", "gateway"},
    "facilitator": {"budgets", "gateway"},
    "budgets": {"facilitator", "gateway"},
    "gateway": set(),
    "devtools": set(),
}
# package -> the packages it may import only inside a function
LAZY_ONLY = {product: {"devtools"} for product in ("storage", "facilitator", "budgets", "gateway")}


def imported(tree: ast.AST, *, in_functions: bool = True) -> set[str]:
    """Absolute module names imported in `tree`; with in_functions=False, only the imports run
    when the module is imported (function bodies skipped)."""
    names: set[str] = set()
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
        if in_functions or not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            stack.extend(ast.iter_child_nodes(node))
    return names


def violations() -> list[str]:
    found = []
    for package, forbidden in FORBIDDEN.items():
        lazy_only = LAZY_ONLY.get(package, set())
        for path in sorted((ROOT / package).rglob("*.py")):
            module = path.relative_to(ROOT).as_posix()
            tree = ast.parse(path.read_text(), module)
            for name in sorted(imported(tree)):
                if name.split(".")[0] in forbidden:
                    found.append(f"{module} imports {name}")
            for name in sorted(imported(tree, in_functions=False)):
                if name.split(".")[0] in lazy_only:
                    found.append(f"{module} imports {name} at module level")
    return found


def test_lower_layers_never_import_higher_ones() -> None:
    assert violations() == []


def test_the_check_sees_lazy_imports() -> None:
    tree = ast.parse("def f():\n    from gateway.app import create_app\n    import budgets.store\n")
    assert imported(tree) == {"gateway.app", "budgets.store"}


def test_module_level_imports_skip_function_bodies_only() -> None:
    source = ("import devtools.rpc\n"
              "if True:\n    from devtools.devchain import DevChain\n"
              "class C:\n    import devtools.upstream\n"
              "def f():\n    from devtools.demo import main\n"
              "async def g():\n    import devtools.solidity\n"
              "h = lambda: __import__('devtools.devconfig')\n")
    assert imported(ast.parse(source), in_functions=False) == {
        "devtools.rpc", "devtools.devchain", "devtools.upstream"}


def test_every_top_level_package_is_layered() -> None:
    packages = {p.parent.name for p in ROOT.glob("*/__init__.py")} - {"tests", "loadtests"}
    assert packages == FORBIDDEN.keys()
