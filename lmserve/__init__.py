"""lmserve's public surface: what a plugin imports, as ``from lmserve import NAME``.

A plugin needs the hook marker and the config and types its hooks receive or
return; this module names them, and these names stay put across releases. Every
other module path (``lmserve.core.*``, ``lmserve.plugins.*``, ``lmserve.backends.*``,
``lmserve.frontends.*``) is internal and may move. docs/plugins.md lists the names.

Nothing is imported until a name is first asked for (PEP 562's module
``__getattr__``): every ``import lmserve.core.x`` runs this file first, so it must
cost nothing, and ``import lmserve`` loads neither torch nor sanic. The model
building blocks load torch, and ``admitted``/``RouteDoc`` load sanic, only when a
plugin imports them.
"""

from __future__ import annotations

import importlib
from typing import Any

#: Each public name, and the module that defines it.
_MODULE_OF = {
    # The hook marker.
    "hookimpl": "lmserve.core",
    # Configuration: what lmserve_configure gets, the commands of lmserve_add_cli_options,
    # what lmserve_resolve_model returns and lmserve_load_tokenizer loads.
    "ServeConfig": "lmserve.core.config",
    "SERVE_API_SERVER": "lmserve.core.config",
    "SERVE_RAY": "lmserve.core.config",
    "CHAT": "lmserve.core.config",
    "MODEL_COMMANDS": "lmserve.core.config",
    "ModelSource": "lmserve.core.model_source",
    "Tokenizer": "lmserve.core.tokenizer",
    # A backend (lmserve_make_backend) and the requests and outputs it handles; the
    # request observers get GenerationRequest and GenerationOutput.
    "Backend": "lmserve.core.backend",
    "BackendStats": "lmserve.core.backend",
    "OutputSink": "lmserve.core.backend",
    "EngineRequest": "lmserve.core.types",
    "EngineOutput": "lmserve.core.types",
    "FinishReason": "lmserve.core.types",
    "SamplingParams": "lmserve.core.types",
    "GenerationRequest": "lmserve.core.types",
    "GenerationOutput": "lmserve.core.types",
    "TokenUsage": "lmserve.core.types",
    "InvalidRequestError": "lmserve.core.types",
    "SessionLostError": "lmserve.core.types",
    # Chat templates (lmserve_chat_templates, lmserve_chat_template).
    "ChatTemplate": "lmserve.core.chat_template",
    "Message": "lmserve.core.chat_template",
    "render_chat": "lmserve.core.chat_template",
    "FieldsChatTemplate": "lmserve.core.fields_chat_template",
    "BaseChatTemplate": "lmserve.core.fields_chat_template",
    # The model's own sampling defaults (lmserve_sampling_defaults).
    "SamplingDefaults": "lmserve.core.sampling_defaults",
    # Tool-call parsers (lmserve_tool_parsers).
    "ToolParser": "lmserve.core.tool_calls",
    "ParsedOutput": "lmserve.core.tool_calls",
    "ParsedToolCall": "lmserve.core.tool_calls",
    "ParsedToolCallDelta": "lmserve.core.tool_calls",
    "new_tool_call_id": "lmserve.core.tool_calls",
    "JsonCallParser": "lmserve.plugins.json_calls",
    # Reasoning parsers (lmserve_reasoning_parsers).
    "ReasoningParser": "lmserve.core.reasoning",
    # Structured outputs' grammar engine (lmserve_grammar_compiler).
    "GrammarCompiler": "lmserve.core.structured_output",
    "OutputGrammar": "lmserve.core.structured_output",
    "TokenConstraint": "lmserve.core.structured_output",
    # Model families for the torch engine (lmserve_model_families); these load torch.
    "ModelFamily": "lmserve.backends.torch.models.family",
    "ModelConfig": "lmserve.backends.torch.model_config",
    "common_hf_fields": "lmserve.backends.torch.model_config",
    "CausalLM": "lmserve.backends.torch.models.causal_lm",
    "Attention": "lmserve.backends.torch.models.attention_layer",
    "GatedMLP": "lmserve.backends.torch.models.mlp",
    "RMSNorm": "lmserve.backends.torch.models.norms",
    # Routes (lmserve_register_routes); these load sanic.
    "admitted": "lmserve.frontends.http.limits",
    "RouteDoc": "lmserve.frontends.http.openapi",
}

__all__ = sorted(_MODULE_OF)


def __getattr__(name: str) -> Any:
    """Import the public ``name`` from its module on first use, and keep it here."""
    try:
        module = _MODULE_OF[name]
    except KeyError:
        raise AttributeError(f"module 'lmserve' has no attribute {name!r}") from None
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
