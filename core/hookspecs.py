"""Every hook lmserve calls, grouped by the phase that calls it.

Built-in plugins (in ``lmserve.plugins``, ``lmserve.backends`` and
``lmserve.frontends``) implement these with the same public
:data:`lmserve.core.hookimpl` marker a third-party package uses. Third-party
packages register through the ``lmserve`` entry-point group, or one module at a
time with ``--plugin module.path``.

Hooks run at startup and once per request, never inside the engine's step
loop: whatever a hook returns is resolved into plain objects before serving.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lmserve.core import hookspec

if TYPE_CHECKING:  # imported for annotations only: the kernel stays light
    from lmserve.core.backend import Backend
    from lmserve.core.chat_template import ChatTemplate
    from lmserve.core.config import ServeConfig
    from lmserve.core.model_source import ModelSource
    from lmserve.core.reasoning import ReasoningParser
    from lmserve.core.sampling_defaults import SamplingDefaults
    from lmserve.core.structured_output import GrammarCompiler
    from lmserve.core.tokenizer import Tokenizer
    from lmserve.core.tool_calls import ToolParser
    from lmserve.core.types import GenerationOutput, GenerationRequest


# --------------------------------------------------------------------------- startup


@hookspec
def lmserve_add_cli_options(command: str, parser: argparse.ArgumentParser) -> None:
    """Add command-line options to one of lmserve's commands.

    Called while the CLI builds its parsers, once per command, before any
    argument is parsed. The parsed values reach plugins through
    :hook:`lmserve_configure` as ``config.options``.

    :param command: the command being built, e.g. ``"serve api_server"``; the
        commands that load a model are :data:`~lmserve.core.config.MODEL_COMMANDS`.
    :param parser: the :class:`argparse.ArgumentParser` of that command; add
        options with ``parser.add_argument``.
    """


@hookspec
def lmserve_configure(config: ServeConfig) -> None:
    """Read the final configuration before anything is loaded.

    Called once by ``lmserve serve api_server`` (and ``lmserve chat``) after the command line is
    parsed, before the model is resolved. Raise to refuse to start; the error
    is reported with the plugin's name.

    :param config: the frozen :class:`~lmserve.core.config.ServeConfig`;
        options added by plugins are in ``config.options``.
    """


# ---------------------------------------------------------------------- registration


@hookspec(firstresult=True)
def lmserve_resolve_model(model: str, tried: list[str]) -> ModelSource | None:
    """Turn the MODEL argument into files on disk.

    Called once at startup. Built-ins try, in this order: a local path (a
    directory or a ``.gguf`` file), the local Hugging Face hub cache, and a
    package installed in the environment that ships the model's GGUF file.
    Nothing is downloaded.

    Stops at first non-None result.

    :param model: what the user passed as MODEL.
    :param tried: a list to append one short line to, saying what was looked
        at, when this implementation does not find the model; the lines form
        the error message when no implementation does.
    :return: a :class:`~lmserve.core.model_source.ModelSource`, or None.
    """


@hookspec(firstresult=True)
def lmserve_load_tokenizer(source: ModelSource) -> Tokenizer | None:
    """Load the tokenizer of a resolved model.

    Called once at startup, after :hook:`lmserve_resolve_model`. The built-in
    reads byte-level BPE tokenizers from GGUF metadata or ``tokenizer.json``.

    Stops at first non-None result.

    :param source: the resolved model.
    :return: a :class:`~lmserve.core.tokenizer.Tokenizer` (or an object with
        the same methods), or None to let another plugin try.
    """


@hookspec(firstresult=True)
def lmserve_make_backend(config: ServeConfig, source: ModelSource, model_families: list[Any]) -> Backend | None:
    """Create the backend that turns token ids into token ids.

    Called once at startup; may take long (weights load here). The built-in
    is the torch engine.

    Stops at first non-None result.

    :param config: the serve configuration.
    :param source: the resolved model.
    :param model_families: every family :hook:`lmserve_model_families` contributed
        (the torch engine runs a model whose architecture one of them claims).
    :return: a started-but-idle :class:`~lmserve.core.backend.Backend`, or
        None to let another plugin provide one.
    """


@hookspec
def lmserve_model_families() -> list[Any]:
    """Contribute model families to the torch engine.

    Called once at startup, before the backend is made. A family is a
    :class:`lmserve.backends.torch.models.family.ModelFamily` (its subclass, really):
    the HF ``architectures`` and GGUF ``general.architecture`` names it claims, how
    it reads their config, the ``torch.nn.Module`` that runs them and how their
    tensors are named (docs/models.md). The built-in families (Llama, Mistral,
    Qwen2/3, Qwen3-MoE, Mixtral, Gemma 2/3, Phi-3, InternLM2) come through this
    hook too; a family contributed by a plugin comes first, so it may also take an
    architecture a built-in one claims.

    :return: a list of family objects (an empty list contributes nothing).
    """


@hookspec
def lmserve_chat_templates() -> list[ChatTemplate]:
    """Contribute named chat templates.

    Called once at startup, and by ``lmserve templates``. Every template
    returned joins the registry: ``--chat-template NAME`` picks it by its
    ``name``, and a model without a template of its own gets the first one
    whose ``matches(model_name)`` is true. Names must be unique.

    :return: a list of :class:`~lmserve.core.chat_template.ChatTemplate`
        objects (an empty list contributes nothing).
    """


@hookspec(firstresult=True)
def lmserve_chat_template(
    source: ModelSource, tokenizer: Tokenizer, config: ServeConfig
) -> ChatTemplate | None:
    """Choose the chat template that renders messages into a prompt.

    Called once at startup. The built-in ``hf`` template renders the model's
    own Jinja template (GGUF ``tokenizer.chat_template`` or
    ``tokenizer_config.json``) in a sandbox; ``base`` (the identity) is the
    last resort.

    Stops at first non-None result.

    :param source: the resolved model.
    :param tokenizer: the model's tokenizer (special tokens, BOS/EOS).
    :param config: the serve configuration.
    :return: a :class:`~lmserve.core.chat_template.ChatTemplate`, or None.
    """


@hookspec(firstresult=True)
def lmserve_sampling_defaults(source: ModelSource, directory: Path | None,
                              config: ServeConfig) -> SamplingDefaults | None:
    """Read the model's own sampling defaults (temperature, top_p, top_k, min_p,
    repetition_penalty, max_tokens) for requests that leave them unset.

    Called once at startup by ``lmserve serve api_server`` (and ``lmserve chat``),
    before the weights load, unless ``--generation-config`` is ``none``, ``vllm`` or
    ``lmdeploy``. The built-in (``lmserve.plugins.generation_config``) reads an HF
    directory's ``generation_config.json`` and a GGUF file's ``general.sampling.*``
    metadata. A request's own values always win over these.

    Stops at first non-None result.

    :param source: the resolved model.
    :param directory: the folder ``--generation-config DIR`` named (it holds a
        ``generation_config.json``; read that instead of the model's), or None
        for ``auto``: the model's own.
    :param config: the serve configuration.
    :return: a :class:`~lmserve.core.sampling_defaults.SamplingDefaults` (build it
        with ``SamplingDefaults.from_file(values, origin)``, which skips invalid
        values with a warning), or None when the model has none.
    """


@hookspec
def lmserve_tool_parsers() -> list[type[ToolParser]]:
    """Contribute tool-call parsers: classes that read the calls a model writes.

    Called once at startup by ``lmserve serve api_server``; the lists of all
    implementations are joined, in hook order. ``--tool-call-parser NAME``
    picks the parser whose ``name`` or one of whose ``aliases`` is NAME (any
    case); without it, the first whose ``fits(template_source)`` is true for
    the chat template, else ``hermes``. The server makes one instance per
    choice of a request with tools (``parser_class()``). Built-ins: ``hermes``,
    ``llama3``, ``internlm`` and ``json`` (which reads ``tool_choice:
    required`` outputs).

    :return: a list of :class:`~lmserve.core.tool_calls.ToolParser`
        subclasses (an empty list contributes nothing).
    """


@hookspec
def lmserve_reasoning_parsers() -> list[type[ReasoningParser]]:
    """Contribute reasoning parsers: classes that split a thinking model's
    reasoning (``<think>...</think>``) from its answer.

    Called once at startup by ``lmserve serve api_server`` (and ``lmserve
    chat``); the lists of all implementations are joined, in hook order.
    ``--reasoning-parser NAME`` picks the parser whose ``name`` or one of whose
    ``aliases`` is NAME (any case; ``none`` turns the split off); without it,
    the first whose ``fits(template_source)`` is true for the chat template's
    source, else none. The server makes one instance per choice of a chat
    request, ``parser_class(prompt_text)`` with the end of the rendered prompt.
    Built-in: ``default`` (aliases ``qwen-qwq``, ``deepseek-r1``, ``intern-s1``,
    ``qwen3``, ``deepseek-v3``, ...).

    :return: a list of :class:`~lmserve.core.reasoning.ReasoningParser`
        subclasses (an empty list contributes nothing).
    """


@hookspec(firstresult=True)
def lmserve_grammar_compiler(tokenizer: Tokenizer) -> GrammarCompiler | None:
    """Provide the grammar engine that constrains structured outputs.

    Called once at startup by ``lmserve serve api_server`` (and once per Ray
    replica), after the tokenizer is loaded. The compiler turns a request's
    ``response_format`` or forced tool call (an
    :class:`~lmserve.core.structured_output.OutputGrammar`) into a per-generation
    :class:`~lmserve.core.structured_output.TokenConstraint` over the model's
    vocabulary. The built-in one uses llguidance
    (``lmserve.plugins.llguidance_grammar``). With none, the server serves free
    text and answers a request that needs a grammar with a 400 saying so.

    Stops at first non-None result.

    :param tokenizer: the model's tokenizer (its vocabulary, as token bytes, and EOS).
    :return: a :class:`~lmserve.core.structured_output.GrammarCompiler`, or None
        to let another plugin provide one.
    """


@hookspec
def lmserve_register_routes(app: Any, state: Any) -> None:
    """Add HTTP routes to the server.

    Called once while the Sanic app is built, after the built-in OpenAI
    routes. The built-in routes are registered through this same hook. A
    route that generates is decorated with
    ``lmserve.frontends.http.limits.admitted`` so the admission limits apply.

    :param app: the :class:`sanic.Sanic` application.
    :param state: the server state (``state.bus``, ``state.tokenizer``,
        ``state.chat_template``, ``state.config``, ``state.model_name``).
    """


# ----------------------------------------------------------------- request lifecycle


@hookspec
def lmserve_request_started(request: GenerationRequest) -> None:
    """Observe a request entering the bus.

    Called once per request, on the event loop, before it reaches the
    backend. Keep it cheap; an exception here is logged and ignored.

    :param request: the request, with its ``request_id`` assigned.
    """


@hookspec
def lmserve_request_finished(
    request: GenerationRequest, output: GenerationOutput, elapsed_s: float
) -> None:
    """Observe a request leaving the bus, finished, aborted or failed.

    Called once per request, on the event loop. An exception here is logged
    and ignored: it never breaks the request.

    :param request: the request.
    :param output: the last output (``finish_reason``, ``usage``, ``error``).
    :param elapsed_s: seconds from entering the bus to finishing.
    """


# -------------------------------------------------------------------------- shutdown


@hookspec
def lmserve_shutdown() -> None:
    """Release what a plugin holds; called once as the server stops."""
