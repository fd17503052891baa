"""Start-up up to the weights: MODEL resolved, its tokenizer loaded, its chat template chosen.

The one sequence of these steps, shared by ``lmserve serve api_server`` (which
goes on to load the weights through :hook:`lmserve_make_backend`) and
``lmserve templates`` (which loads no weights):

1. :hook:`lmserve_resolve_model` turns MODEL into files
   (:class:`~lmserve.core.model_source.ModelNotFoundError` when no plugin can);
2. :hook:`lmserve_load_tokenizer` loads the tokenizer from them
   (:class:`~lmserve.core.plugins.PluginError` when no plugin can);
3. :func:`~lmserve.core.template_choice.choose_chat_template` chooses the template.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from lmserve.core.config import ServeConfig
from lmserve.core.model_source import ModelNotFoundError, ModelSource
from lmserve.core.plugins import PluginError, call_safely
from lmserve.core.template_choice import TemplateChoice, choose_chat_template

if TYPE_CHECKING:  # imported for annotations only
    import pluggy

    from lmserve.core.backend import Backend
    from lmserve.core.tokenizer import Tokenizer


@dataclass(frozen=True)
class ResolvedModel:
    """MODEL before its weights: where its files are, its tokenizer, its chat template."""

    source: ModelSource
    #: What :hook:`lmserve_load_tokenizer` returned (a Tokenizer, or an object with its methods).
    tokenizer: Tokenizer
    #: The chat template and why it was chosen.
    template_choice: TemplateChoice


def resolve_model(
    pm: pluggy.PluginManager, config: ServeConfig, announce: Callable[[str], None] | None = None
) -> ResolvedModel:
    """Resolve ``config.model``, load its tokenizer and choose its chat template, through the hooks.

    :param announce: called with one line for the startup log as soon as the
        model is found, and again once the template is chosen.
    """
    tried: list[str] = []
    source = call_safely(pm, "lmserve_resolve_model", model=config.model, tried=tried)
    if source is None:
        raise ModelNotFoundError(config.model, tried)
    if announce is not None:
        announce(f"model {config.model!r} found by {source.found_by}: {source.path}")
    tokenizer = call_safely(pm, "lmserve_load_tokenizer", source=source)
    if tokenizer is None:
        raise PluginError(f"No plugin could load the tokenizer of {source.path}.")
    choice = choose_chat_template(pm, source, tokenizer, config)
    if announce is not None:
        announce(f"chat template {choice.template.name!r}: {choice.reason}")
    return ResolvedModel(source, tokenizer, choice)


def make_backend(pm: pluggy.PluginManager, config: ServeConfig, source: ModelSource) -> Backend:
    """The backend :hook:`lmserve_make_backend` builds for ``source`` (the weights load here);
    :class:`~lmserve.core.plugins.PluginError` when no plugin builds one."""
    families = [family for contributed in call_safely(pm, "lmserve_model_families") for family in contributed]
    backend = call_safely(pm, "lmserve_make_backend", config=config, source=source, model_families=families)
    if backend is None:
        raise PluginError("No backend plugin is loaded.")
    return backend
