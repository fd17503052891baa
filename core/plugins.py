"""The plugin manager: built-ins first, then entry points, then ``--plugin``."""

from __future__ import annotations

import importlib
import importlib.metadata
from dataclasses import dataclass
from typing import Iterable

import pluggy

from lmserve.core import PROJECT_NAME, hookspecs

# Built-in plugins are ordinary plugins; this tuple is the whole list.
DEFAULT_PLUGINS: tuple[str, ...] = (
    "lmserve.plugins.model_sources",
    "lmserve.plugins.tokenizers",
    "lmserve.plugins.hf_chat_template",
    "lmserve.plugins.base_chat_template",
    "lmserve.plugins.chat_templates",
    "lmserve.plugins.tool_parsers",
    "lmserve.plugins.reasoning_parsers",
    "lmserve.plugins.generation_config",
    "lmserve.plugins.llguidance_grammar",
    "lmserve.backends.torch.plugin",
    "lmserve.backends.ray.plugin",
    "lmserve.frontends.http.routes",
    "lmserve.frontends.interactive.routes",
    "lmserve.frontends.http.metrics",
    "lmserve.frontends.http.request_log",
)

ENTRY_POINT_GROUP = PROJECT_NAME


class PluginError(RuntimeError):
    """A plugin could not be loaded or misbehaved at startup."""


def create_plugin_manager(
    extra_modules: Iterable[str] = (), *, load_entry_points: bool = True
) -> pluggy.PluginManager:
    """Build the plugin manager.

    Registers the built-ins of :data:`DEFAULT_PLUGINS`, then third-party
    packages of the ``lmserve`` entry-point group, then ``extra_modules``
    (``--plugin module.path``), and checks that every hook implementation
    matches a spec, so a misspelt hook fails loudly.
    """
    pm = pluggy.PluginManager(PROJECT_NAME)
    pm.add_hookspecs(hookspecs)
    for name in DEFAULT_PLUGINS:
        pm.register(importlib.import_module(name), name=name)
    if load_entry_points:
        try:
            pm.load_setuptools_entrypoints(ENTRY_POINT_GROUP)
        except Exception as exc:  # a broken third-party package
            raise PluginError(f"Loading plugins of entry-point group {ENTRY_POINT_GROUP!r} failed: {exc}") from exc
    for name in extra_modules:
        try:
            module = importlib.import_module(name)
        except ImportError as exc:
            raise PluginError(f"--plugin {name}: cannot import it ({exc}).") from exc
        if pm.get_plugin(name) is None:
            pm.register(module, name=name)
    try:
        pm.check_pending()
    except pluggy.PluginValidationError as exc:
        raise PluginError(f"Plugin {pm.get_name(exc.plugin)!r} implements an unknown hook: {exc}") from exc
    return pm


@dataclass(frozen=True)
class PluginInfo:
    name: str
    version: str | None
    source: str  # "builtin", "entry point <dist>", or "--plugin"
    hooks: tuple[str, ...]


def list_plugins(pm: pluggy.PluginManager) -> list[PluginInfo]:
    """What is loaded, in registration order, with the hooks each implements."""
    dists = {id(plugin): dist for plugin, dist in pm.list_plugin_distinfo()}
    infos = []
    for name, plugin in pm.list_name_plugin():
        if plugin is None:
            continue
        hooks = tuple(sorted(caller.name for caller in pm.get_hookcallers(plugin) or ()))
        dist = dists.get(id(plugin))
        if dist is not None:
            version, source = dist.version, f"entry point of {dist.metadata['name']}"
        elif name in DEFAULT_PLUGINS:
            version, source = _own_version(), "builtin"
        else:
            version, source = None, "--plugin"
        infos.append(PluginInfo(name, version, source, hooks))
    return infos


def call_safely(pm: pluggy.PluginManager, hook_name: str, **kwargs):
    """Call a startup hook through pluggy; an exception names the plugin that raised it.

    pluggy runs the call (ordering, firstresult, wrappers); only the error is ours.
    """
    caller = getattr(pm.hook, hook_name)
    try:
        return caller(**kwargs)
    except Exception as exc:
        raise PluginError(
            f"Plugin {_plugin_that_raised(caller, exc)!r} failed in {hook_name}: {type(exc).__name__}: {exc}"
        ) from exc


def _plugin_that_raised(caller, exc: BaseException) -> str:
    """The plugin whose implementation is the innermost one in ``exc``'s traceback."""
    plugins = {getattr(impl.function, "__code__", None): impl.plugin_name for impl in caller.get_hookimpls()}
    name = "unknown"
    traceback = exc.__traceback__
    while traceback is not None:
        name = plugins.get(traceback.tb_frame.f_code, name)
        traceback = traceback.tb_next
    return name


def _own_version() -> str | None:
    try:
        return importlib.metadata.version(PROJECT_NAME)
    except importlib.metadata.PackageNotFoundError:
        return None

