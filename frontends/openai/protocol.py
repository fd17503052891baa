"""Pydantic models of the OpenAI request bodies lmserve accepts.

Unknown keys are ignored (LMDeploy's APIClient sends a literal ``kwargs``
key). Values are parsed as pydantic's default (lax) mode parses them, as
LMDeploy's server does: ``"stream": "true"`` is true and ``"max_tokens": "16"``
is 16; what lax mode refuses is a 400 naming the field. Range checks live in
:class:`~lmserve.core.types.SamplingParams`, so every way in validates the same way.
"""

from __future__ import annotations

from typing import Any, Literal, Union

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, model_validator


class RequestBody(BaseModel):
    """A JSON request body: unknown keys ignored, lax types."""

    model_config = ConfigDict(extra="ignore")


class TextPart(RequestBody):
    type: Literal["text"]
    text: str


class CalledFunction(RequestBody):
    name: str
    #: The arguments object as JSON text (OpenAI's shape).
    arguments: str


class ToolCallMessage(RequestBody):
    """A call an assistant message made, sent back in a later request's history."""

    id: str
    type: Literal["function"] = "function"
    function: CalledFunction


class ChatMessage(RequestBody):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Union[str, list[TextPart], None] = None
    #: An assistant message's calls.
    tool_calls: list[ToolCallMessage] | None = None
    #: A tool message: the call it answers.
    tool_call_id: str | None = None
    name: str | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)

    def for_template(self) -> dict:
        """The message as chat templates take it (OpenAI's shape, content as text)."""
        message: dict = {"role": self.role, "content": self.text()}
        if self.tool_calls:
            message["tool_calls"] = [call.model_dump() for call in self.tool_calls]
        if self.tool_call_id is not None:
            message["tool_call_id"] = self.tool_call_id
        if self.name is not None:
            message["name"] = self.name
        return message


class StreamOptions(RequestBody):
    include_usage: bool = False


class JsonSchemaFormat(RequestBody):
    name: str = "response"
    description: str | None = None
    #: The schema (``schema`` in the body; the attribute name avoids pydantic's own ``schema``).
    json_schema: Union[dict[str, Any], bool, None] = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormat(RequestBody):
    """OpenAI's ``response_format`` and LMDeploy's ``regex_schema`` type."""

    type: Literal["text", "json_object", "json_schema", "regex_schema"] = "text"
    json_schema: JsonSchemaFormat | None = None
    regex_schema: str | None = None

    @model_validator(mode="after")
    def _has_its_schema(self) -> ResponseFormat:
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("type json_schema needs a json_schema object ({name, schema, strict})")
        if self.type == "regex_schema" and not self.regex_schema:
            raise ValueError("type regex_schema needs a regex_schema (a regular expression)")
        return self


class FunctionDefinition(RequestBody):
    name: str = Field(pattern=r"^[A-Za-z0-9_.\-]{1,64}$")
    description: str | None = None
    #: JSON schema of the arguments object (OpenAI: absent means no arguments).
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(RequestBody):
    type: Literal["function"] = "function"
    function: FunctionDefinition


class NamedFunction(RequestBody):
    name: str


class NamedToolChoice(RequestBody):
    type: Literal["function"] = "function"
    function: NamedFunction


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
    tools: list[Tool] | None = None
    tool_choice: Union[Literal["none", "auto", "required"], NamedToolChoice, None] = None
    parallel_tool_calls: bool = True
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
