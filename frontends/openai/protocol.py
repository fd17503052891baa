"""Pydantic models of the OpenAI request bodies lmserve accepts.

Unknown keys are ignored (LMDeploy's APIClient sends a literal ``kwargs``
key). Range checks live in :class:`~lmserve.core.types.SamplingParams`, so
every way in validates the same way.
"""

from __future__ import annotations

from typing import Literal, Union

from pydantic import BaseModel, ConfigDict, Field


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")


class TextPart(_Request):
    type: Literal["text"]
    text: str


class ChatMessage(_Request):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Union[str, list[TextPart], None] = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class StreamOptions(_Request):
    include_usage: bool = False


class _Sampling(_Request):
    """Fields shared by chat and completions."""

    model: str
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    seed: int | None = None
    n: int = 1
    stop: Union[str, list[str], None] = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    user: str | None = None


class ChatCompletionRequest(_Sampling):
    # A plain string is a raw prompt: no chat template (as in LMDeploy).
    messages: Union[str, list[ChatMessage]] = Field(min_length=1)


class CompletionRequest(_Sampling):
    prompt: Union[str, list[int]]


class EncodeRequest(_Request):
    """LMDeploy's ``POST /v1/encode``."""

    input: Union[str, list[str]]
    do_preprocess: bool = False  # render ``input`` as one user turn through the chat template
    add_bos: bool = True


class TokenizeRequest(_Request):
    """``POST /tokenize`` (vLLM's shape): a ``prompt``, or ``messages`` rendered by the chat template."""

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True


class DetokenizeRequest(_Request):
    """``POST /detokenize``."""

    model: str | None = None
    tokens: list[int]
