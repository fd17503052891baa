"""The named exclusions of the schemathesis run over the whole API (``SCHEMATHESIS_HOOKS=schemathesis_exclusions``).

Two checks of ``--checks all`` are replaced by narrower ones; every other check runs as it is.

- ``negative_data_rejection`` -> ``rejects_invalid_data_but_lax_types``: the server parses
  request bodies as LMDeploy's does (pydantic's lax mode: ``"stream": "true"``,
  ``"max_tokens": "16"`` and ``"echo": 0`` are taken), while the document says the
  types generated clients should send. A schema-invalid body the server accepts is
  still a failure unless the values lax mode read from it make a schema-valid body.
- ``positive_data_acceptance`` -> ``accepts_valid_data_but_named_limits``: rules no JSON
  schema can state refuse a schema-valid body with a 400 that names them
  (:data:`UNSTATABLE_LIMITS`), and a ``response_format`` grammar (a JSON schema or a
  regular expression) that the grammar compiler cannot compile is a 400 naming
  ``response_format`` (what it compiles is the compiler's, not the document's). Any
  other refusal of a schema-valid body is still a failure.
"""

from __future__ import annotations

import re

import jsonschema
import pydantic
import schemathesis
from schemathesis.specs.openapi.checks import negative_data_rejection, positive_data_acceptance

from lmserve.frontends.interactive.protocol import InteractiveRequest
from lmserve.frontends.http.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    EncodeRequest,
    TokenizeRequest,
)

#: The request models by path: what the server parses each body with.
MODELS: dict[str, type[pydantic.BaseModel]] = {
    "/v1/chat/completions": ChatCompletionRequest,
    "/v1/completions": CompletionRequest,
    "/v1/chat/interactive": InteractiveRequest,
    "/v1/encode": EncodeRequest,
    "/tokenize": TokenizeRequest,
    "/detokenize": DetokenizeRequest,
}
#: The refusals of schema-valid bodies that a schema cannot rule out, by name: the message of each 400.
UNSTATABLE_LIMITS = {
    # How many tokens a text makes is the tokenizer's business.
    "a prompt longer than the context": re.compile(
        r"The prompt has \d+ tokens, but this model's maximum context length is \d+ tokens"),
    # A product of two fields (prompts x n); each is bounded in the document.
    "at most 256 choices a request": re.compile(r"A request may ask for at most \d+ choices \(prompts x n\)"),
    # Which names a tool_choice may give depends on the same body's tools.
    "a tool_choice naming a function outside tools": re.compile(
        r"tool_choice names the function .*, which is not in tools"),
    # JSON text of an object: the document says so with contentMediaType/contentSchema,
    # which are annotations that validators do not check.
    "tool call arguments that are no JSON object": re.compile(r"The arguments of the call to .* must be a JSON object"),
}


def lax_reading_is_valid(case) -> bool:
    """Whether the values lax parsing reads from ``case.body`` make a body the document allows."""
    model = MODELS.get(case.operation.path)
    if model is None or not isinstance(case.body, dict):
        return False
    try:
        parsed = model.model_validate(case.body)
    except pydantic.ValidationError:
        return False
    read = parsed.model_dump(mode="json", by_alias=True, exclude_unset=True)
    document = case.operation.schema.raw_schema
    name = model.__name__
    validator = jsonschema.Draft202012Validator({"$ref": f"#/components/schemas/{name}", **document})
    return validator.is_valid(read)


@schemathesis.check
def rejects_invalid_data_but_lax_types(ctx, response, case):
    try:
        return negative_data_rejection(ctx, response, case)
    except AssertionError:
        if lax_reading_is_valid(case):
            return None
        raise


@schemathesis.check
def accepts_valid_data_but_named_limits(ctx, response, case):
    try:
        return positive_data_acceptance(ctx, response, case)
    except AssertionError:
        if response.status_code == 400 and (any(rule.search(response.text) for rule in UNSTATABLE_LIMITS.values())
                                            or grammar_refused(case, response)):
            return None
        raise


def grammar_refused(case, response) -> bool:
    """A 400 naming ``response_format`` for a body whose response_format has a JSON schema or a regex."""
    body = case.body if isinstance(case.body, dict) else {}
    response_format = body.get("response_format")
    try:
        param = response.json().get("param")
    except ValueError:
        return False
    return (param == "response_format" and isinstance(response_format, dict)
            and response_format.get("type") in ("json_schema", "regex_schema"))
