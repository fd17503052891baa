"""Pydantic models of the OpenAI request bodies lmserve accepts.

Unknown keys are ignored (LMDeploy's APIClient sends a literal ``kwargs``
key). Types are strict, as OpenAI's API is: ``true`` or ``"0.5"`` is not a
number (an int is a float, though). Range checks live in
:class:`~lmserve.core.types.SamplingParams`, so every way in validates the same way.
"""

from __future__ import annotations

from typing import Literal, Union

from pydantic import AliasChoices, BaseModel, ConfigDict, Field


class RequestBody(BaseModel):
    """A JSON request body: unknown keys ignored, strict types."""

    model_config = ConfigDict(extra="ignore", strict=True)


class TextPart(RequestBody):
    type: Literal["text"]
    text: str


class ChatMessage(RequestBody):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Union[str, list[TextPart], None] = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class StreamOptions(RequestBody):
    include_usage: bool = False


class ResponseFormat(RequestBody):
    type: Literal["text", "json_object", "json_schema"] = "text"


class _Sampling(RequestBody):
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
    #: Choices per prompt; the prompt is computed and counted once.
    n: int = Field(1, ge=1, le=128)
    stop: Union[str, list[str], None] = None
    include_stop_str_in_output: bool = False
    stop_token_ids: list[int] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    #: EOS and stop tokens are not generated before this many tokens (LMDeploy: min_new_tokens).
    min_tokens: int | None = Field(None, validation_alias=AliasChoices("min_tokens", "min_new_tokens"))
    response_format: ResponseFormat | None = None
    user: str | None = None
    #: LMDeploy's; these APIs keep nothing, so the id of a live interactive session is refused.
    session_id: int | None = None


class ChatCompletionRequest(_Sampling):
    # A plain string is a raw prompt: no chat template (as in LMDeploy).
    messages: Union[str, list[ChatMessage]] = Field(min_length=1)
    logprobs: bool = False
    top_logprobs: int | None = None
    #: False: no chat template; the messages' texts are the prompt (LMDeploy).
    do_preprocess: bool = True


class CompletionRequest(_Sampling):
    #: A string, a list of strings, token ids, or a list of token-id lists;
    #: each prompt gets its own ``n`` choices.
    prompt: Union[str, list[str], list[int], list[list[int]]]
    #: Log-probabilities of each token and of this many top alternatives.
    logprobs: int | None = None
    echo: bool = False  # prepend the prompt to each choice's text


class EncodeRequest(RequestBody):
    """LMDeploy's ``POST /v1/encode``."""

    input: Union[str, list[str]]
    do_preprocess: bool = False  # render ``input`` as one user turn through the chat template
    add_bos: bool = True


class TokenizeRequest(RequestBody):
    """``POST /tokenize`` (vLLM's shape): a ``prompt``, or ``messages`` rendered by the chat template."""

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = Field(None, min_length=1)
    add_special_tokens: bool = True
    add_generation_prompt: bool = True


class DetokenizeRequest(RequestBody):
    """``POST /detokenize``."""

    model: str | None = None
    tokens: list[int]
