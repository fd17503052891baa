"""The body of ``POST /v1/chat/interactive`` and its reply, as LMDeploy 0.9 defined them."""

from __future__ import annotations

from typing import Literal, Union

from pydantic import Field

from lmserve.frontends.openai.protocol import ChatMessage, RequestBody, ResponseFormat
from lmserve.frontends.openai.responses import Response


class InteractiveRequest(RequestBody):
    #: The new turn: a user message's text, or OpenAI messages.
    prompt: Union[str, list[ChatMessage]]
    #: The conversation; -1: a one-shot conversation that keeps nothing.
    session_id: int = -1
    #: True: keep the history on the server after this turn; False: end the session after it.
    interactive_mode: bool = False
    stream: bool = False
    stop: Union[str, list[str], None] = None
    #: Most tokens to generate; None: all the room left in the session.
    request_output_len: int | None = None
    top_p: float = 0.8
    top_k: int = 40
    temperature: float = 0.8
    repetition_penalty: float = 1.0
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    #: Stop the running turn of ``session_id``; the history is kept.
    cancel: bool = False
    seed: int | None = None
    min_new_tokens: int | None = None
    min_p: float = 0.0
    #: Structured output, as in /v1/chat/completions (JSON schema, JSON object, regex).
    response_format: ResponseFormat | None = None
    #: Vision-language and LoRA inputs of LMDeploy: refused with a 400 (not supported).
    image_url: Union[str, list[str], None] = None
    adapter_name: str | None = None


class InteractiveResponse(Response):
    """The reply; as a stream, one per line, ``text`` being the new text and the counts running totals."""

    text: str
    tokens: int = Field(description="Tokens generated in this turn (the stop token included).")
    input_tokens: int = Field(description="Tokens of this turn's input, as the template rendered it.")
    history_tokens: int = Field(description="Tokens of the session before this turn: every earlier "
                                "turn's input and output tokens.")
    finish_reason: Literal["stop", "length", "abort", "error"] | None
    error: str | None = Field(None, description="Why the turn failed, with finish_reason error.")
