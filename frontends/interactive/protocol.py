"""The body of ``POST /v1/chat/interactive`` and its reply, as LMDeploy 0.9 defined them;
the reply of ``POST /v1/sessions`` (lmserve's)."""

from __future__ import annotations

from typing import Literal, Union

from pydantic import ConfigDict, Field

from lmserve.frontends.http.protocol import (
    ChatMessage,
    ChatTemplateFields,
    RequestBody,
    ResponseFormat,
    Stop,
    requires_when,
    limits,
)
from lmserve.frontends.http.responses import Response


def _only_null(schema: dict) -> None:
    schema.clear()
    schema.update({"type": "null", "default": None})


class InteractiveRequest(ChatTemplateFields):
    # A cancel names its session.
    model_config = ConfigDict(json_schema_extra=requires_when(
        "cancel", {"const": True}, "session_id", {"not": {"const": -1}}))

    #: The new turn: a user message's text, or OpenAI messages.
    prompt: Union[str, list[ChatMessage]]
    #: The conversation; -1: a one-shot conversation that keeps nothing.
    session_id: int = -1
    #: True: keep the history on the server after this turn; False: end the session after it.
    interactive_mode: bool = False
    stream: bool = False
    stop: Stop = None
    #: Most tokens to generate; None: all the room left in the session.
    request_output_len: int | None = limits(minimum=0)
    top_p: float = limits(0.8, exclusiveMinimum=0, maximum=1)
    top_k: int = limits(40, minimum=0)
    temperature: float = limits(0.8, minimum=0, maximum=2)
    repetition_penalty: float = limits(1.0, exclusiveMinimum=0)
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    #: Stop the running turn of ``session_id``; the history is kept.
    cancel: bool = False
    seed: int | None = None
    min_new_tokens: int | None = limits(minimum=0)
    min_p: float = limits(0.0, minimum=0, maximum=1)
    #: Structured output, as in /v1/chat/completions (JSON schema, JSON object, regex).
    response_format: ResponseFormat | None = None
    #: Vision-language and LoRA inputs of LMDeploy: parsed, so that a value is refused with a 400
    #: that says why; the document says null, all this server takes.
    image_url: Union[str, list[str], None] = Field(None, json_schema_extra=_only_null)
    adapter_name: str | None = Field(None, json_schema_extra=_only_null)


class InteractiveResponse(Response):
    """The reply; as a stream, one per line, ``text`` being the new text and the counts running totals."""

    text: str
    tokens: int = Field(description="Tokens generated in this turn (the stop token included).")
    input_tokens: int = Field(description="Tokens of this turn's input, as the template rendered it.")
    history_tokens: int = Field(description="Tokens of the session before this turn: every earlier "
                                "turn's input and output tokens.")
    finish_reason: Literal["stop", "length", "abort", "error"] | None
    reasoning_content: str = Field(  # type: ignore[assignment]
        None, description="The reasoning (``<think>...</think>``) apart from `text`, which then holds only the "
        "answer: present on the replies and lines of a generated turn when the server splits reasoning "
        "(--reasoning-parser).", json_schema_extra=lambda schema: schema.pop("default", None))
    error: str | None = Field(None, description="Why the turn failed, with finish_reason error.")


class SessionCreated(Response):
    """The reply of ``POST /v1/sessions``."""

    session_id: int = Field(description="The new session's id: random in [1, 2^53), unused. Send it as the "
                            "`session_id` of `/v1/chat/interactive` turns.")
