"""A request's ``response_format`` as the grammar its output must match."""

from __future__ import annotations

from lmserve.core.structured_output import OutputGrammar
from lmserve.frontends.openai.protocol import ResponseFormat


def output_grammar(response_format: ResponseFormat | None) -> OutputGrammar | None:
    """None for free text; OpenAI's ``json_object`` and ``json_schema`` and LMDeploy's
    ``regex_schema`` otherwise (a JSON schema given without ``schema`` allows any JSON value)."""
    if response_format is None or response_format.type == "text":
        return None
    if response_format.type == "json_object":
        return OutputGrammar.json_object()
    if response_format.type == "json_schema":
        schema = response_format.json_schema.json_schema
        return OutputGrammar.json_schema(True if schema is None else schema)
    return OutputGrammar.regex(response_format.regex_schema)
