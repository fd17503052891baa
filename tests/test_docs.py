"""The docs cover every hook and every flag; these fail when one is missing."""

import argparse
import inspect
import re
from pathlib import Path

import pytest

from lmserve.core import hookspecs
from lmserve.core.plugins import create_plugin_manager
from lmserve.frontends.cli import build_parser

DOCS = Path(__file__).resolve().parent.parent / "docs"
HOOKS = sorted(name for name in dir(hookspecs) if name.startswith("lmserve_"))


def _documented_heading(hook: str) -> re.Match | None:
    return re.search(rf"^### `{hook}\((?P<args>[^)]*)\)`(?P<kinds>.*)$", (DOCS / "plugins.md").read_text(), re.M)


@pytest.mark.parametrize("hook", HOOKS)
def test_every_hook_is_documented_with_its_signature(hook):
    heading = _documented_heading(hook)
    assert heading, f"{hook} is missing from docs/plugins.md"
    spec = getattr(hookspecs, hook)
    arguments = [name for name in inspect.signature(spec).parameters]
    documented = [name.strip() for name in heading["args"].split(",") if name.strip()]
    assert documented == arguments, f"docs/plugins.md documents {hook}({', '.join(documented)})"
    options = spec.lmserve_spec
    assert ("(firstresult)" in heading["kinds"]) == bool(options.get("firstresult")), (
        f"docs/plugins.md and hookspecs disagree on whether {hook} is firstresult")
    assert ("(historic)" in heading["kinds"]) == bool(options.get("historic")), (
        f"docs/plugins.md and hookspecs disagree on whether {hook} is historic")


def _flags(parser: argparse.ArgumentParser):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                yield from _flags(sub)
        for option in action.option_strings:
            if option.startswith("--") and option != "--help":
                yield option


def test_every_cli_flag_is_documented():
    parser = build_parser(create_plugin_manager(load_entry_points=False))
    text = (DOCS / "cli.md").read_text()
    missing = sorted({flag for flag in _flags(parser) if f"`{flag}" not in text})
    assert not missing, f"docs/cli.md lacks {missing}"
