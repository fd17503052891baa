"""The public surface for plugin authors: ``from lmserve import NAME``, and nothing deeper.

docs/plugins.md's examples and the example plugin are what a plugin author copies, so
they must import lmserve's names only from the top-level package; every name that
package exports must resolve, and docs/plugins.md must list exactly those names.
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

import lmserve

REPO_ROOT = Path(__file__).resolve().parent.parent
PLUGINS_DOC = REPO_ROOT / "docs" / "plugins.md"
EXAMPLE = REPO_ROOT / "examples" / "lmserve-hello-plugin"


def _python_blocks(markdown: str) -> list[tuple[int, str]]:
    """(line of the opening fence, code) of every ```python block."""
    return [(markdown.count("\n", 0, match.start()) + 1, match["code"])
            for match in re.finditer(r"^```python\n(?P<code>.*?)^```", markdown, re.M | re.S)]


def _deep_imports(source: str, where: str) -> list[str]:
    """Every import in ``source`` that reaches lmserve other than ``from lmserve import <public name>``."""
    found = []
    for node in ast.walk(ast.parse(source, where)):
        if isinstance(node, ast.Import):
            found += [f"{where}:{node.lineno} import {alias.name}" for alias in node.names
                      if alias.name.split(".")[0] == "lmserve"]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "lmserve":
            names = [alias.name for alias in node.names]
            if node.module != "lmserve" or node.level:
                found.append(f"{where}:{node.lineno} from {node.module} import {', '.join(names)}")
            else:
                found += [f"{where}:{node.lineno} from lmserve import {name} (not public)"
                          for name in names if name not in lmserve.__all__]
    return found


def _example_sources() -> list[tuple[str, str]]:
    """(where, source) of docs/plugins.md's python blocks and the example plugin's .py files."""
    blocks = [(f"docs/plugins.md:{line}", code) for line, code in _python_blocks(PLUGINS_DOC.read_text())]
    files = [(str(path.relative_to(REPO_ROOT)), path.read_text()) for path in sorted(EXAMPLE.rglob("*.py"))]
    return blocks + files


def test_the_examples_are_found():
    sources = dict(_example_sources())
    assert sum(where.startswith("docs/plugins.md") for where in sources) >= 3
    assert {"lmserve_hello_plugin.py", "lmserve_hello_family.py", "test_hello_plugin.py"} <= {
        Path(where).name for where in sources}


def test_docs_and_the_example_plugin_import_only_the_public_surface():
    assert [found for where, source in _example_sources() for found in _deep_imports(source, where)] == []


def test_the_check_flags_deep_and_non_public_imports():
    sample = ("from lmserve import hookimpl, ModelFamily\n"
              "from sanic.response import text\n"
              "def f():\n"
              "    from lmserve.core import hookimpl\n"
              "    import lmserve.core.types\n"
              "    from lmserve import core\n")
    assert _deep_imports(sample, "sample.py") == [
        "sample.py:4 from lmserve.core import hookimpl",
        "sample.py:5 import lmserve.core.types",
        "sample.py:6 from lmserve import core (not public)",
    ]


def test_every_exported_name_resolves():
    unresolved = []
    for name in lmserve.__all__:
        try:
            getattr(lmserve, name)
        except (AttributeError, ImportError) as error:
            unresolved.append(f"{name}: {error}")
    assert unresolved == []
    assert set(lmserve.__all__) <= set(dir(lmserve))
    from lmserve.core import hookimpl
    assert lmserve.hookimpl is hookimpl


def test_an_unknown_name_is_an_attribute_error():
    with pytest.raises(AttributeError, match="no attribute 'internal_thing'"):
        lmserve.internal_thing  # noqa: B018
    with pytest.raises(ImportError):
        exec("from lmserve import internal_thing", {})


def test_from_lmserve_import_hookimpl_works_in_a_fresh_interpreter_outside_the_repository(tmp_path):
    code = ("import sys\n"
            "from lmserve import hookimpl\n"
            "from lmserve.core import hookimpl as core_hookimpl\n"
            "assert hookimpl is core_hookimpl\n"
            "print(','.join(m for m in ('torch', 'sanic') if m in sys.modules))\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "", f"from lmserve import hookimpl loaded {result.stdout.strip()}"


def test_docs_list_exactly_the_exported_names():
    text = PLUGINS_DOC.read_text()
    section = re.search(r"^## Public surface\n(?P<body>.*?)^## ", text, re.M | re.S)
    assert section, "docs/plugins.md has no '## Public surface' section"
    rows = [line.split("|")[2] for line in section["body"].splitlines() if line.startswith("| ")]
    listed = {name for cell in rows for name in re.findall(r"`(\w+)`", cell)}
    assert listed == set(lmserve.__all__)
