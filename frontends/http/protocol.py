"""Pydantic models of the OpenAI request bodies lmserve accepts.

Unknown keys are ignored (LMDeploy's APIClient sends a literal ``kwargs``
key). Values are parsed as pydantic's default (lax) mode parses them, as
LMDeploy's server does: ``"stream": "true"`` is true and ``"max_tokens": "16"``
is 16; what lax mode refuses is a 400 naming the field. Range checks live in
:class:`~lmserve.core.types.SamplingParams`, so every way in validates the same way;
the ranges are also stated here (:func:`limits`), for ``/openapi.json``, so a
generated client refuses what the server would. Limits that depend on the model
(token ids below the vocabulary's size) are added to the document when the server
starts (:mod:`lmserve.frontends.http.openapi`).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, model_validator

from lmserve.core.chat_template import RESERVED_TEMPLATE_VARIABLES, template_variables


def limits(default: Any = None, **schema: Any) -> Any:
    """A field whose JSON schema states the range the server checks (``minimum``, ``maximum``,
    ``exclusiveMinimum``, ...); the check itself, with its message, stays where it is."""
    return Field(default, json_schema_extra=schema)


#: The most stop strings a request may send, and their most characters.
MAX_STOP_STRINGS = 16
MAX_STOP_STRING_LENGTH = 256
#: ``stop``: a string or a list of them (schema only: sampling.checked_stop_strings checks).
_STOP_STRING = {"minLength": 1, "maxLength": MAX_STOP_STRING_LENGTH}
Stop = Union[Annotated[str, Field(json_schema_extra=_STOP_STRING)],
             Annotated[list[Annotated[str, Field(json_schema_extra=_STOP_STRING)]],
                       Field(json_schema_extra={"maxItems": MAX_STOP_STRINGS})],
             None]
#: Schema only: a non-empty string, list (the routes refuse empty prompts with their own message).
NonEmpty = {"minLength": 1}
NonEmptyList = {"minItems": 1}

#: A token id: the document's maximum (the vocabulary's size - 1) is added when the server starts.
TOKEN_ID_MARK = "x-lmserve-token-id"
TOKEN_ID = {"minimum": 0, TOKEN_ID_MARK: True}
TokenId = Annotated[int, Field(json_schema_extra=TOKEN_ID)]
#: A token id written in decimal (a ``logit_bias`` key); the pattern is narrowed to the vocabulary the same way.
TOKEN_ID_TEXT = {"pattern": "^[0-9]+$", TOKEN_ID_MARK: True}


class RequestBody(BaseModel):
    """A JSON request body: unknown keys ignored, lax types."""

    model_config = ConfigDict(extra="ignore")


class TextPart(RequestBody):
    type: Literal["text"]
    text: str


class CalledFunction(RequestBody):
    name: str
    #: The arguments object as JSON text (OpenAI's shape).
    arguments: str = Field(json_schema_extra={"contentMediaType": "application/json",
                                              "contentSchema": {"type": "object"}})


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


def requires_when(field: str, value: Any, required: str, schema: dict) -> dict:
    """JSON Schema's "when ``field`` is ``value``, ``required`` must be there and match ``schema``"."""
    return {"if": {"required": [field], "properties": {field: value}},
            "then": {"required": [required], "properties": {required: schema}}}


class ResponseFormat(RequestBody):
    """OpenAI's ``response_format`` and LMDeploy's ``regex_schema`` type."""

    model_config = ConfigDict(json_schema_extra={"allOf": [
        requires_when("type", {"const": "json_schema"}, "json_schema", {"type": "object"}),
        requires_when("type", {"const": "regex_schema"}, "regex_schema", {"type": "string", "minLength": 1}),
    ]})

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


#: ``chat_template_kwargs``' rules, for the document (:func:`template_variables` checks them).
_TEMPLATE_KWARGS = {"propertyNames": {"not": {"enum": list(RESERVED_TEMPLATE_VARIABLES)}},
                    "properties": {"enable_thinking": {"type": ["boolean", "null"]}}}


class ChatTemplateFields(RequestBody):
    """The fields a request's chat template reads as variables (vLLM's and LMDeploy's)."""

    chat_template_kwargs: dict[str, Any] | None = Field(None, json_schema_extra={
        **_TEMPLATE_KWARGS, "description": "Extra variables for the chat template, as transformers' "
        "apply_chat_template(**kwargs) takes them, e.g. {\"enable_thinking\": false} (Qwen3). Not "
        f"{', '.join(RESERVED_TEMPLATE_VARIABLES)}: the server sets those."})
    enable_thinking: bool | None = Field(None, description="LMDeploy's older spelling of "
                                         "chat_template_kwargs.enable_thinking; that one wins when both are set.")

    def template_kwargs(self) -> dict[str, Any]:
        """The template's extra variables (a 400 naming the field when one is wrong)."""
        return template_variables(self.chat_template_kwargs, self.enable_thinking)


#: The rules between fields of chat and completions, for the document (the routes check them).
_STREAM_OPTIONS_NEED_STREAM = requires_when("stream_options", {"type": "object"}, "stream", {"const": True})


class _Sampling(RequestBody):
    """Fields shared by chat and completions."""

    model_config = ConfigDict(json_schema_extra={"allOf": [_STREAM_OPTIONS_NEED_STREAM]})

    model: str
    max_tokens: int | None = limits(minimum=1)
    max_completion_tokens: int | None = limits(minimum=1)
    temperature: float | None = limits(minimum=0, maximum=2)
    top_p: float | None = limits(exclusiveMinimum=0, maximum=1)
    top_k: int | None = limits(minimum=0)
    min_p: float | None = limits(minimum=0, maximum=1)
    repetition_penalty: float | None = limits(exclusiveMinimum=0)
    presence_penalty: float | None = limits(minimum=-2, maximum=2)
    frequency_penalty: float | None = limits(minimum=-2, maximum=2)
    #: Token id -> bias; biases beyond [-100, 100] are clamped.
    logit_bias: dict[str, float] | None = limits(propertyNames=TOKEN_ID_TEXT)
    seed: int | None = None
    #: Choices per prompt; the prompt is computed and counted once.
    n: int = Field(1, ge=1, le=128)
    stop: Stop = None
    include_stop_str_in_output: bool = False
    stop_token_ids: list[TokenId] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    #: EOS and stop tokens are not generated before this many tokens (LMDeploy: min_new_tokens).
    min_tokens: int | None = Field(None, validation_alias=AliasChoices("min_tokens", "min_new_tokens"),
                                   json_schema_extra={"minimum": 0})
    response_format: ResponseFormat | None = None
    user: str | None = None
    #: LMDeploy's; these APIs keep nothing, so the id of a live interactive session is refused.
    session_id: int | None = None


class ChatCompletionRequest(_Sampling, ChatTemplateFields):
    model_config = ConfigDict(json_schema_extra={"allOf": [
        _STREAM_OPTIONS_NEED_STREAM,
        # A positive top_logprobs needs logprobs (LMDeploy's APIClient always sends top_logprobs 0).
        requires_when("top_logprobs", {"type": "integer", "minimum": 1}, "logprobs", {"const": True}),
        # A tool_choice other than "none" needs tools.
        requires_when("tool_choice", {"not": {"enum": [None, "none"]}}, "tools", {"type": "array", "minItems": 1}),
        # Without the template the messages' texts are the prompt: one of them must have some text.
        requires_when("do_preprocess", {"const": False}, "messages", {"anyOf": [
            {"type": "string"},
            {"type": "array", "contains": {"required": ["content"], "properties": {"content": {"anyOf": [
                {"type": "string", "minLength": 1},
                {"type": "array", "contains": {"required": ["text"], "properties": {"text": {"minLength": 1}}}},
            ]}}}},
        ]}),
    ]})

    # A plain string is a raw prompt: no chat template (as in LMDeploy).
    messages: Union[Annotated[str, Field(json_schema_extra=NonEmpty)],
                    Annotated[list[ChatMessage], Field(json_schema_extra=NonEmptyList)]] = Field(min_length=1)
    tools: list[Tool] | None = None
    tool_choice: Union[Literal["none", "auto", "required"], NamedToolChoice, None] = None
    parallel_tool_calls: bool = True
    logprobs: bool = False
    top_logprobs: int | None = limits(minimum=0, maximum=20)
    #: False: no chat template; the messages' texts are the prompt (LMDeploy).
    do_preprocess: bool = True


class CompletionRequest(_Sampling):
    #: A string, a list of strings, token ids, or a list of token-id lists;
    #: each prompt gets its own ``n`` choices.
    prompt: Union[Annotated[str, Field(json_schema_extra=NonEmpty)],
                  Annotated[list[Annotated[str, Field(json_schema_extra=NonEmpty)]], Field(json_schema_extra=NonEmptyList)],
                  Annotated[list[TokenId], Field(json_schema_extra=NonEmptyList)],
                  Annotated[list[Annotated[list[TokenId], Field(json_schema_extra=NonEmptyList)]],
                            Field(json_schema_extra=NonEmptyList)]]
    #: Log-probabilities of each token and of this many top alternatives.
    logprobs: int | None = limits(minimum=0, maximum=20)
    echo: bool = False  # prepend the prompt to each choice's text


class EncodeRequest(RequestBody):
    """LMDeploy's ``POST /v1/encode``."""

    input: Union[str, list[str]]
    do_preprocess: bool = False  # render ``input`` as one user turn through the chat template
    add_bos: bool = True


class TokenizeRequest(RequestBody):
    """``POST /tokenize`` (vLLM's shape): a ``prompt``, or ``messages`` rendered by the chat template."""

    # Exactly one of prompt and messages (not null).
    model_config = ConfigDict(json_schema_extra={
        "if": {"required": ["prompt"], "properties": {"prompt": {"type": "string"}}},
        "then": {"properties": {"messages": {"type": "null"}}},
        "else": {"required": ["messages"], "properties": {"messages": {"type": "array"}}},
    })

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = Field(None, min_length=1)
    add_special_tokens: bool = True
    add_generation_prompt: bool = True


class DetokenizeRequest(RequestBody):
    """``POST /detokenize``."""

    model: str | None = None
    tokens: list[TokenId]
