"""The doors between the packages, the names, and the sizes a reader can hold in mind.

Imports are read from the source (every ``import``, also inside functions and
``TYPE_CHECKING`` blocks), so a forbidden door fails here even where no test
happens to run through it. Each checker takes the folder it walks, and each rule has
a test that adds a violation to a sample folder and sees the checker report it.
"""

from __future__ import annotations

import ast
import sys
from collections import defaultdict
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent

#: The folders of the product: what ships in the wheel.
PRODUCT_FOLDERS = ("core", "plugins", "backends", "frontends", "lmserve")

#: What core/ may import besides itself and the standard library. Anything else (a
#: grammar engine, torch, sanic) comes in through a plugin behind a hook.
CORE_MAY_IMPORT = {"pluggy", "numpy", "tiktoken"}

#: The longest function a reader should have to hold in mind, in lines.
MAX_FUNCTION_LINES = 60
#: Where the function limit holds: the request's path, front to back.
FUNCTION_LIMIT_FOLDERS = ("core", "frontends", "backends")
#: Kernels are written as one long loop each, on purpose (a launch per function); they
#: have their own file limit instead.
KERNELS = "backends/torch/kernels"

MAX_FILE_LINES = 450
MAX_KERNEL_FILE_LINES = 400


def _python_files(folder: str, root: Path = REPO_ROOT) -> list[Path]:
    return sorted((root / folder).rglob("*.py"))


def _tree(path: Path) -> ast.Module:
    return ast.parse(path.read_text(), str(path))


# ------------------------------------------------------------------------ imports


def _imports(path: Path) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in ``path``."""
    found = []
    for node in ast.walk(_tree(path)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: inside its own package
                found.append((node.lineno, "lmserve." + path.parent.name))
            else:
                found.append((node.lineno, node.module or ""))
    return found


def _violations(folder: str, allowed, root: Path = REPO_ROOT) -> list[str]:
    return [f"{path.relative_to(root)}:{line} imports {module}"
            for path in _python_files(folder, root) for line, module in _imports(path) if not allowed(module)]


def _standard_library(module: str) -> bool:
    top = module.split(".")[0]
    return top in sys.stdlib_module_names or top == "__future__"


def _core_may_import(module: str) -> bool:
    top = module.split(".")[0]
    if top == "lmserve":
        return module == "lmserve.core" or module.startswith("lmserve.core.")
    return _standard_library(module) or top in CORE_MAY_IMPORT


def test_core_imports_only_core_the_standard_library_and_its_few_libraries():
    assert _violations("core", _core_may_import) == []


def test_the_core_rule_flags_a_library_outside_the_allowlist(tmp_path):
    (tmp_path / "core").mkdir()
    (tmp_path / "core" / "grammar.py").write_text(
        "import numpy\nfrom lmserve.core import hookimpl\n\ndef compile():\n    import llguidance\n")
    assert _violations("core", _core_may_import, tmp_path) == ["core/grammar.py:5 imports llguidance"]


def test_frontends_import_neither_plugins_nor_backends():
    def allowed(module: str) -> bool:
        return not module.startswith(("lmserve.plugins", "lmserve.backends"))

    assert _violations("frontends", allowed) == []


def test_the_public_surface_imports_only_the_standard_library_when_imported():
    """Every ``import lmserve.core.x`` runs lmserve/__init__.py first: it must stay lazy."""
    assert _violations("lmserve", _standard_library) == []


def test_the_import_rules_see_imports_inside_functions(tmp_path):
    sample = tmp_path / "sample.py"
    sample.write_text("def f():\n    import torch\n    from lmserve.backends.torch import engine\n")
    assert [module for _, module in _imports(sample)] == ["torch", "lmserve.backends.torch"]


# -------------------------------------------------------------------------- names


def _class_definitions(folders, root: Path = REPO_ROOT) -> dict[str, list[str]]:
    """Each class name, with the ``file:line`` of every class of that name (nested ones too)."""
    definitions = defaultdict(list)
    for folder in folders:
        for path in _python_files(folder, root):
            for node in ast.walk(_tree(path)):
                if isinstance(node, ast.ClassDef):
                    definitions[node.name].append(f"{path.relative_to(root)}:{node.lineno}")
    return definitions


def _duplicate_class_names(folders, root: Path = REPO_ROOT) -> dict[str, list[str]]:
    return {name: places for name, places in _class_definitions(folders, root).items() if len(places) > 1}


def test_no_class_name_is_defined_twice_in_the_product():
    assert _duplicate_class_names(PRODUCT_FOLDERS) == {}


def test_the_name_rule_flags_a_class_defined_twice_also_when_nested(tmp_path):
    (tmp_path / "core").mkdir()
    (tmp_path / "frontends").mkdir()
    (tmp_path / "core" / "types.py").write_text("class Usage:\n    pass\n\nclass Other:\n    pass\n")
    (tmp_path / "frontends" / "responses.py").write_text("class Reply:\n    class Usage:\n        pass\n")
    assert _duplicate_class_names(("core", "frontends"), tmp_path) == {
        "Usage": ["core/types.py:1", "frontends/responses.py:2"]}


# -------------------------------------------------------------------------- sizes


def _long_functions(path: Path, limit: int, root: Path = REPO_ROOT) -> list[str]:
    return [f"{path.relative_to(root)}:{node.lineno} {node.name} has {node.end_lineno - node.lineno + 1} lines"
            for node in ast.walk(_tree(path))
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            and node.end_lineno - node.lineno + 1 > limit]


def _long_functions_under(folders, limit: int, root: Path = REPO_ROOT, skip: str = KERNELS) -> list[str]:
    return [found for folder in folders for path in _python_files(folder, root)
            if not path.is_relative_to(root / skip) for found in _long_functions(path, limit, root)]


def _long_files(folders, limit: int, root: Path = REPO_ROOT) -> dict[str, int]:
    sizes = {str(path.relative_to(root)): len(path.read_text().splitlines())
             for folder in folders for path in _python_files(folder, root)}
    return {name: lines for name, lines in sizes.items() if lines > limit}


def test_request_path_functions_stay_under_sixty_lines():
    assert _long_functions_under(FUNCTION_LIMIT_FOLDERS, MAX_FUNCTION_LINES) == []


def test_the_function_rule_flags_sixty_one_lines_and_skips_the_kernels(tmp_path):
    def function(name: str, lines: int) -> str:
        return f"async def {name}():\n" + "    x = 1\n" * (lines - 1)

    (tmp_path / "core").mkdir()
    (tmp_path / "core" / "bus.py").write_text(function("fits", 60) + "\n\n" + function("generate", 61))
    kernels = tmp_path / KERNELS
    kernels.mkdir(parents=True)
    (kernels / "sampling.py").write_text(function("sample", 200))
    assert _long_functions_under(("core", "backends"), 60, tmp_path) == ["core/bus.py:63 generate has 61 lines"]


def test_product_files_stay_under_four_hundred_fifty_lines():
    assert _long_files(PRODUCT_FOLDERS, MAX_FILE_LINES) == {}


def test_kernel_files_stay_under_four_hundred_lines():
    assert _long_files((KERNELS,), MAX_KERNEL_FILE_LINES) == {}


def test_the_file_rule_flags_four_hundred_fifty_one_lines(tmp_path):
    (tmp_path / "plugins").mkdir()
    (tmp_path / "plugins" / "short.py").write_text("x = 1\n" * 450)
    (tmp_path / "plugins" / "long.py").write_text("x = 1\n" * 451)
    assert _long_files(("plugins",), 450, tmp_path) == {"plugins/long.py": 451}
