"""Pydantic models of the response bodies the HTTP routes send.

The routes build their JSON by hand (the hot path stays plain dicts); these
models are the contract: ``/openapi.json`` is generated from them, and the
schemathesis test checks every response against them. A field here without a
default is always present in the response; a field with a default may be
absent (OpenAI's streaming ``delta`` keys, ``usage`` on chunks).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, RootModel

#: Why a choice ended (the values of :class:`lmserve.core.types.FinishReason`).
FinishReasonName = Literal["stop", "length", "tool_calls", "abort", "error"]


class Response(BaseModel):
    """A JSON response body: exactly the fields declared."""

    model_config = ConfigDict(extra="forbid")


# ------------------------------------------------------------------------ errors


class ErrorDetail(Response):
    object: Literal["error"]
    message: str
    type: str = Field(description="OpenAI's error type, e.g. invalid_request_error.")
    param: str | None = Field(description="The request field at fault, when there is one.")
    code: int = Field(description="The HTTP status.")


class ErrorResponse(Response):
    """OpenAI's ``{"error": {...}}`` with LMDeploy's top-level copies of the same fields."""

    error: ErrorDetail
    object: Literal["error"]
    message: str
    type: str
    param: str | None
    code: int


# ------------------------------------------------------------------------- usage


class PromptTokensDetails(Response):
    cached_tokens: int = Field(description="Prompt tokens served from the prefix cache.")


class CompletionTokensDetails(Response):
    reasoning_tokens: int = Field(description="Completion tokens spent reasoning: those up to and including the "
                                  "reasoning's close tag (all of them when it never closed).")


class Usage(Response):
    """Token counts: each prompt counted once, every choice's completion tokens."""

    model_config = ConfigDict(json_schema_extra=lambda schema: _no_defaults(schema))

    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails
    completion_tokens_details: CompletionTokensDetails = Field(  # type: ignore[assignment]
        None, description="Chat completions on a server that splits reasoning (--reasoning-parser).")


# ---------------------------------------------------------------------- logprobs


class TopLogprob(Response):
    token: str
    logprob: float
    bytes: list[int] = Field(description="The token's UTF-8 bytes (a token may hold part of a character).")


class ChatTokenLogprob(Response):
    token: str
    logprob: float
    bytes: list[int]
    top_logprobs: list[TopLogprob]


class ChatLogprobs(Response):
    content: list[ChatTokenLogprob]


class CompletionLogprobs(Response):
    """Completions' column layout: one entry per token in each list (with ``echo``,
    the prompt's tokens first; the first prompt token has null logprob and alternatives)."""

    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int] = Field(description="Where each token starts in the choice's text.")


# -------------------------------------------------------------- chat completions


class FunctionCall(Response):
    name: str
    arguments: str = Field(description="The arguments object as JSON text.")


class ToolCall(Response):
    id: str
    type: Literal["function"]
    function: FunctionCall


class AssistantMessage(Response):
    model_config = ConfigDict(json_schema_extra=lambda schema: _no_defaults(schema))

    role: Literal["assistant"]
    content: str | None = Field(description="The text; null when the reply is only tool calls, or only "
                                "reasoning.")
    reasoning_content: str | None = Field(None, description="The reasoning before the answer (``<think>...</think>``), "
                                          "null when there was none; present when the server splits reasoning "
                                          "(--reasoning-parser).")
    tool_calls: list[ToolCall] = Field(None, description="Present when the request had tools and the model "
                                       "called them (finish_reason ``tool_calls``).")  # type: ignore[assignment]


class ChatCompletionChoice(Response):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None
    finish_reason: FinishReasonName


class ChatCompletion(Response):
    """The body of a non-streaming ``POST /v1/chat/completions``."""

    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatCompletionChoice]
    usage: Usage


def _no_defaults(schema: dict) -> None:
    """The fields are absent when unset, never null: the schema shows no ``default``."""
    for field_schema in schema.get("properties", {}).values():
        field_schema.pop("default", None)


class FunctionCallDelta(Response):
    """A piece of a streamed call: the name once, on its first delta; the arguments' JSON text in pieces."""

    model_config = ConfigDict(json_schema_extra=_no_defaults)

    name: str = None  # type: ignore[assignment]
    arguments: str


class ToolCallDelta(Response):
    model_config = ConfigDict(json_schema_extra=_no_defaults)

    index: int = Field(description="Which call of the choice this piece belongs to.")
    id: str = None  # type: ignore[assignment]
    type: Literal["function"] = None  # type: ignore[assignment]
    function: FunctionCallDelta


class ChatCompletionDelta(Response):
    """What a chunk adds to a choice. Every chunk carries the role and a content
    string (LMDeploy's shape); the chunk with ``finish_reason`` has content ``""``."""

    model_config = ConfigDict(json_schema_extra=_no_defaults)

    role: Literal["assistant"]
    content: str
    reasoning_content: str = Field(None, description="New reasoning text, on chunks that carry some (the "
                                   "server splits reasoning: --reasoning-parser).")  # type: ignore[assignment]
    tool_calls: list[ToolCallDelta] = None  # type: ignore[assignment]


class ChatCompletionChunkChoice(Response):
    index: int
    delta: ChatCompletionDelta
    logprobs: ChatLogprobs | None
    finish_reason: FinishReasonName | None


class ChatCompletionChunk(Response):
    """One server-sent event of a streaming ``POST /v1/chat/completions``.

    With ``stream_options.include_usage`` every chunk has ``usage: null`` and a
    last chunk with no choices carries the usage.
    """

    id: str
    object: Literal["chat.completion.chunk"]
    created: int
    model: str
    choices: list[ChatCompletionChunkChoice]
    usage: Usage | None = None


# -------------------------------------------------------------- text completions


class CompletionChoice(Response):
    index: int = Field(description="prompt index * n + choice number.")
    text: str
    logprobs: CompletionLogprobs | None
    finish_reason: FinishReasonName


class Completion(Response):
    """The body of a non-streaming ``POST /v1/completions``."""

    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage


class CompletionChunkChoice(Response):
    index: int
    text: str
    logprobs: CompletionLogprobs | None
    finish_reason: FinishReasonName | None


class CompletionChunk(Response):
    """One server-sent event of a streaming ``POST /v1/completions``."""

    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChunkChoice]
    usage: Usage | None = None


# ------------------------------------------------------------------ other routes


class ModelCard(Response):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    root: str
    max_model_len: int = Field(description="The context length in tokens.")
    sampling_defaults: dict[str, float] = Field(
        description="The model's sampling defaults (--generation-config): what a chat or completions request that "
        "leaves temperature, top_p, top_k, min_p, repetition_penalty or max_tokens unset gets; empty: none.")


class ModelList(Response):
    object: Literal["list"]
    data: list[ModelCard]


class HealthResponse(Response):
    status: Literal["ok"]


class EncodeResult(Response):
    """``input`` was a string."""

    input_ids: list[int]
    length: int


class EncodeBatchResult(Response):
    """``input`` was a list of strings: one entry per string."""

    input_ids: list[list[int]]
    length: list[int]


class EncodeResponse(RootModel[EncodeResult | EncodeBatchResult]):
    """The body of ``POST /v1/encode``."""


class TokenizeResponse(Response):
    count: int
    max_model_len: int
    tokens: list[int]


class DetokenizeResponse(Response):
    prompt: str
