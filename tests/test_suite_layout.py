"""The suite's layout: shared helpers live in tests/support/, conftest.py holds fixtures only, and no module
under tests/ imports conftest or a test module (each test module can be read and run on its own)."""

from __future__ import annotations

import ast
from pathlib import Path

TESTS = Path(__file__).resolve().parent


def imported_modules(tree: ast.Module, package: str) -> set[str]:
    """Every module an import anywhere in ``tree`` names (inside functions too), made absolute.

    ``from tests import conftest`` names both ``tests`` and ``tests.conftest``; ``package`` resolves
    relative imports (``from . import x`` in tests/support/ is ``tests.support.x``).
    """
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parent, base] if base else parent)
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


def forbidden(modules: set[str]) -> set[str]:
    """The imported modules that are conftest or a test module."""
    return {name for name in modules
            if name.split(".")[-1] == "conftest" or name.split(".")[-1].startswith("test_")}


def python_files() -> list[Path]:
    return sorted(path for path in TESTS.rglob("*.py") if "__pycache__" not in path.parts)


def package_of(path: Path) -> str:
    return ".".join(path.relative_to(TESTS.parent).parent.parts)


def test_the_checker_sees_every_spelling_of_a_forbidden_import() -> None:
    source = """
import tests.conftest
from tests.conftest import Server
from tests import conftest
from conftest import Server
from tests.test_live_locks import sessions
from . import test_http_server
def helper():
    from tests.test_live_cache import run_in_session
import tests.support.servers
from tests.support.scrape import Metrics
"""
    found = forbidden(imported_modules(ast.parse(source), "tests"))
    assert found == {"tests.conftest", "conftest", "tests.test_live_locks", "tests.test_http_server",
                     "tests.test_live_cache"}


def test_no_module_under_tests_imports_conftest_or_a_test_module() -> None:
    problems = {str(path.relative_to(TESTS)): sorted(bad) for path in python_files()
                if (bad := forbidden(imported_modules(ast.parse(path.read_text(encoding="utf-8")),
                                                      package_of(path))))}
    assert problems == {}


def test_helpers_live_in_the_support_package() -> None:
    """Directly under tests/ there are only test modules, conftest.py and the package marker."""
    loose = [path.name for path in TESTS.glob("*.py")
             if not path.name.startswith("test_") and path.name not in {"conftest.py", "__init__.py"}]
    assert loose == []
    assert (TESTS / "support" / "__init__.py").exists()


def test_conftest_holds_fixtures_and_hooks_only() -> None:
    tree = ast.parse((TESTS / "conftest.py").read_text(encoding="utf-8"))
    extra = []
    for node in tree.body:
        if isinstance(node, ast.FunctionDef):
            fixture = any("fixture" in ast.unparse(decorator) for decorator in node.decorator_list)
            if not (fixture or node.name.startswith("pytest_")):
                extra.append(node.name)
        elif isinstance(node, ast.ClassDef):
            extra.append(node.name)
        elif isinstance(node, ast.Assign | ast.AnnAssign):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            extra.extend(name for t in targets if (name := ast.unparse(t)) != "pytest_plugins")
    assert extra == [], "helpers belong in tests/support/"
