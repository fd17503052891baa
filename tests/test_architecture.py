"""The doors between the packages, and the sizes a reader can hold in mind.

Imports are read from the source (every ``import``, also inside functions and
``TYPE_CHECKING`` blocks), so a forbidden door fails here even where no test
happens to run through it.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent

#: What core/ may import besides itself and the standard library (llguidance: the
#: structured outputs' grammar engine, imported when a grammar is first compiled).
CORE_MAY_IMPORT = {"pluggy", "tiktoken", "numpy", "llguidance"}


def _python_files(folder: str) -> list[Path]:
    return sorted((REPO_ROOT / folder).rglob("*.py"))


def _imports(path: Path) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in ``path``."""
    tree = ast.parse(path.read_text(), str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: inside its own package
                found.append((node.lineno, "lmserve." + path.parent.name))
            else:
                found.append((node.lineno, node.module or ""))
    return found


def _violations(folder: str, allowed) -> list[str]:
    return [f"{path.relative_to(REPO_ROOT)}:{line} imports {module}"
            for path in _python_files(folder) for line, module in _imports(path) if not allowed(module)]


def test_core_imports_only_core_the_standard_library_and_its_few_libraries():
    def allowed(module: str) -> bool:
        top = module.split(".")[0]
        if top == "lmserve":
            return module == "lmserve.core" or module.startswith("lmserve.core.")
        return top in sys.stdlib_module_names or top in CORE_MAY_IMPORT or top == "__future__"

    assert _violations("core", allowed) == []


def test_frontends_import_neither_plugins_nor_backends():
    def allowed(module: str) -> bool:
        return not module.startswith(("lmserve.plugins", "lmserve.backends"))

    assert _violations("frontends", allowed) == []


def test_the_import_rules_see_imports_inside_functions(tmp_path):
    sample = tmp_path / "sample.py"
    sample.write_text("def f():\n    import torch\n    from lmserve.backends.torch import engine\n")
    assert [module for _, module in _imports(sample)] == ["torch", "lmserve.backends.torch"]


def _long_functions(path: Path, limit: int) -> list[str]:
    tree = ast.parse(path.read_text(), str(path))
    return [f"{path.name}:{node.lineno} {node.name} has {node.end_lineno - node.lineno + 1} lines"
            for node in ast.walk(tree)
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            and node.end_lineno - node.lineno + 1 > limit]


@pytest.mark.parametrize("path", ["core/bus.py", "backends/torch/model_runner.py", "backends/torch/engine.py"])
def test_request_path_functions_stay_under_sixty_lines(path):
    assert _long_functions(REPO_ROOT / path, 60) == []


def test_kernel_files_stay_under_four_hundred_lines():
    sizes = {path.name: len(path.read_text().splitlines()) for path in _python_files("backends/torch/kernels")}
    assert {name: lines for name, lines in sizes.items() if lines > 400} == {}
