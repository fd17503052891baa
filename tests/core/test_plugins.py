import json
import subprocess
import sys
import textwrap

import pytest

from lmserve.core import hookimpl
from lmserve.core.config import ServeConfig
from lmserve.core.plugins import DEFAULT_PLUGINS, PluginError, call_safely, create_plugin_manager, list_plugins


def test_builtins_are_registered_with_their_hooks():
    pm = create_plugin_manager(load_entry_points=False)
    infos = {info.name: info for info in list_plugins(pm)}
    assert set(DEFAULT_PLUGINS) <= set(infos)
    assert "lmserve_make_backend" in infos["lmserve.backends.torch.plugin"].hooks
    assert "lmserve_resolve_model" in infos["lmserve.plugins.model_sources"].hooks
    assert all(info.source == "builtin" for name, info in infos.items() if name in DEFAULT_PLUGINS)


def test_a_misspelt_hook_fails_loudly(tmp_path, monkeypatch):
    (tmp_path / "typo_plugin.py").write_text(
        "from lmserve.core import hookimpl\n"
        "@hookimpl\n"
        "def lmserve_resolve_modle(model, tried):\n"
        "    return None\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(PluginError, match="typo_plugin"):
        create_plugin_manager(["typo_plugin"], load_entry_points=False)


def test_unknown_plugin_module_is_a_clear_error():
    with pytest.raises(PluginError, match="no_such_module_here"):
        create_plugin_manager(["no_such_module_here"], load_entry_points=False)


def test_a_raising_startup_hook_names_its_plugin():
    pm = create_plugin_manager(load_entry_points=False)

    class Broken:
        @hookimpl
        def lmserve_configure(self, config):
            raise RuntimeError("boom")

    pm.register(Broken(), name="broken-plugin")
    try:
        with pytest.raises(PluginError, match="broken-plugin.*boom"):
            call_safely(pm, "lmserve_configure", config=ServeConfig(model="m"))
    finally:
        pm.unregister(name="broken-plugin")


def test_firstresult_hook_returns_first_non_none():
    pm = create_plugin_manager(load_entry_points=False)

    class Resolver:
        @hookimpl(tryfirst=True)
        def lmserve_resolve_model(self, model, tried):
            return "mine" if model == "special" else None

    pm.register(Resolver(), name="resolver")
    try:
        assert call_safely(pm, "lmserve_resolve_model", model="special", tried=[]) == "mine"
        tried: list[str] = []
        assert call_safely(pm, "lmserve_resolve_model", model="/no/such/dir", tried=tried) is None
        assert any("does not exist" in line for line in tried)
    finally:
        pm.unregister(name="resolver")


def _fake_distribution(root, name="lmserve-fake-plugin", module="lmserve_fake_plugin"):
    """An installed-looking package: a module plus a dist-info with an entry point."""
    (root / f"{module}.py").write_text(
        textwrap.dedent(
            """
            from lmserve.core import hookimpl

            @hookimpl
            def lmserve_add_cli_options(command, parser):
                if command == "plugins":
                    parser.add_argument("--fake-flag", action="store_true")
            """
        )
    )
    dist_info = root / f"{name.replace('-', '_')}-1.2.3.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.2.3\n")
    (dist_info / "entry_points.txt").write_text(f"[lmserve]\nfake = {module}\n")


def test_lmserve_plugins_lists_an_entry_point_plugin(tmp_path):
    _fake_distribution(tmp_path)
    env = {"PYTHONPATH": str(tmp_path)}
    result = subprocess.run(
        [sys.executable, "-m", "lmserve.frontends.cli", "plugins", "--json", "--fake-flag"],
        capture_output=True, text=True, env={**__import__("os").environ, **env},
    )
    assert result.returncode == 0, result.stderr
    plugins = {p["name"]: p for p in json.loads(result.stdout)}
    assert "fake" in plugins
    assert plugins["fake"]["version"] == "1.2.3"
    assert "lmserve-fake-plugin" in plugins["fake"]["source"]
    assert plugins["fake"]["hooks"] == ["lmserve_add_cli_options"]
    assert set(DEFAULT_PLUGINS) <= set(plugins)


def test_lmserve_plugins_table_lists_builtins():
    result = subprocess.run(
        [sys.executable, "-m", "lmserve.frontends.cli", "plugins"], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    for name in DEFAULT_PLUGINS:
        assert name in result.stdout


def test_a_wrapper_hook_runs_through_pluggy_and_the_raiser_is_named():
    pm = create_plugin_manager(load_entry_points=False)
    seen = []

    class Wrapper:
        @hookimpl(wrapper=True)
        def lmserve_configure(self, config):
            seen.append("before")
            result = yield
            seen.append("after")
            return result

    class Broken:
        @hookimpl
        def lmserve_configure(self, config):
            raise RuntimeError("boom")

    pm.register(Wrapper(), name="wrapper-plugin")
    try:
        call_safely(pm, "lmserve_configure", config=ServeConfig(model="m"))
        assert seen == ["before", "after"]
        pm.register(Broken(), name="broken-plugin")
        with pytest.raises(PluginError, match="'broken-plugin'.*boom"):
            call_safely(pm, "lmserve_configure", config=ServeConfig(model="m"))
    finally:
        pm.unregister(name="wrapper-plugin")
        if pm.has_plugin("broken-plugin"):
            pm.unregister(name="broken-plugin")
