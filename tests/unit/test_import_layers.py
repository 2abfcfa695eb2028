"""The import direction of the product packages: gateway -> budgets and facilitator -> storage.
A lower layer never imports a higher one, and budgets and facilitator never import each other.
Every import statement counts, those inside functions too (a lazy import is still a dependency)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

# package -> the packages it must not import
FORBIDDEN = {
    "storage": {"facilitator", "budgets", "gateway"},
    "facilitator": {"budgets", "gateway"},
    "budgets": {"facilitator", "gateway"},
    "gateway": set(),
}
# Dev tooling that is moving out of the product packages (into a devtools package of its own):
# allowed to break the layers until then. Empty today: none of it does.
ALLOWED: set[str] = set()


def imported(tree: ast.AST) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
    return names


def violations() -> list[str]:
    found = []
    for package, forbidden in FORBIDDEN.items():
        for path in sorted((ROOT / package).rglob("*.py")):
            module = path.relative_to(ROOT).as_posix()
            if module in ALLOWED:
                continue
            for name in sorted(imported(ast.parse(path.read_text(), module))):
                if name.split(".")[0] in forbidden:
                    found.append(f"{module} imports {name}")
    return found


def test_lower_layers_never_import_higher_ones() -> None:
    assert violations() == []


def test_the_check_sees_lazy_imports() -> None:
    tree = ast.parse("def f():\n    from gateway.app import create_app\n    import budgets.store\n")
    assert imported(tree) == {"gateway.app", "budgets.store"}
