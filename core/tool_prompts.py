"""How chat templates write OpenAI tools, tool calls and tool results into a prompt.

LMDeploy's three formats for its templates of fields
(:class:`~lmserve.core.fields_chat_template.FieldsChatTemplate`'s ``tool_format``):
``hermes`` (Qwen2.5's: ``<tools>`` in the system message, ``<tool_call>`` JSON,
``<tool_response>`` results), ``internlm2`` (``<|action_start|><|plugin|>``) and
``llama3.1`` (JSON after ``<|python_tag|>``). Hermes text is also what
:func:`~lmserve.core.chat_template.render_chat` gives a template that renders no
tools itself.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from lmserve.core.types import InvalidRequestError

if TYPE_CHECKING:
    from lmserve.core.chat_template import Message, MessageToolCall

#: How :class:`FieldsChatTemplate` writes tools (its ``tool_format``), as LMDeploy
#: does: ``hermes`` (Qwen2.5's), ``internlm2``, ``llama3.1``; None is Hermes text too.
TOOL_FORMATS = ("hermes", "internlm2", "llama3.1")

_HERMES_TOOLS = ("# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
                 "You are provided with function signatures within <tools></tools> XML tags:\n<tools>")
_HERMES_END_TOOLS = ("\n</tools>\n\nFor each function call, return a json object with function name and "
                     "arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n"
                     '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>')
_LLAMA31_TOOLS = ("Given the following functions, please respond with a JSON for a function call with its proper "
                  "arguments that best answers the given prompt.\n\n"
                  'Respond in the format {"name": function name, "parameters": dictionary of argument name and its '
                  "value}. Do not use variables.\n\n")


def tool_call_parts(call: MessageToolCall) -> tuple[str, dict[str, Any]]:
    """A call's function name and arguments object (parsed from its JSON text).

    Raises ``InvalidRequestError`` (``messages``) for a malformed call or
    arguments that are not a JSON object.
    """
    function = call.get("function") if isinstance(call, dict) else None
    name = function.get("name") if isinstance(function, dict) else None
    if not isinstance(name, str):
        raise InvalidRequestError('A tool call must be {"id", "type": "function", "function": {"name", '
                                  f'"arguments"}}}}, got {call!r}.', "messages")
    arguments = function.get("arguments")
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except ValueError:
            pass
    if not isinstance(arguments, dict):
        raise InvalidRequestError(f"The arguments of the call to {name!r} must be a JSON object, got "
                                  f"{function.get('arguments')!r}.", "messages")
    return name, arguments


def hermes_messages(messages: Sequence[Message], tools: Sequence[dict] | None,
                    default_system: str | None = None, *, merge_results: bool = True) -> list[Message]:
    """``messages`` as plain messages with tools, calls and results in Hermes text (Qwen2.5's format).

    The tools' instructions follow the system message's text (else
    ``default_system``'s, else they are the system message); each call is a
    ``<tool_call>`` JSON line after its message's content; consecutive tool
    results become one user message of ``<tool_response>`` blocks (unless not
    ``merge_results``: then they stay ``tool`` messages).
    """
    plain: list[Message] = []
    for index, message in enumerate(messages):
        if message["role"] == "tool" and merge_results:
            response = f"<tool_response>\n{message_text(message)}\n</tool_response>"
            if index and messages[index - 1]["role"] == "tool":
                plain[-1] = {"role": "user", "content": f"{plain[-1]['content']}\n{response}"}
            else:
                plain.append({"role": "user", "content": response})
        else:
            plain.append(with_calls_as_text(message, hermes_calls))
    if not tools:
        return plain
    listed = "".join("\n" + json.dumps({"type": "function", "function": function_of(tool)}, ensure_ascii=False)
                     for tool in tools)
    instructions = f"{_HERMES_TOOLS}{listed}{_HERMES_END_TOOLS}"
    system, rest = split_system(plain, default_system)
    return [{"role": "system", "content": instructions if system is None else f"{system}\n\n{instructions}"}, *rest]


def llama31_messages(messages: Sequence[Message], tools: Sequence[dict] | None,
                      default_system: str | None) -> list[Message]:
    """Llama 3.1's JSON tool calling: ``Environment: ipython`` in the system turn,
    the tools before the first user message's text, calls after ``<|python_tag|>``."""
    plain = [with_calls_as_text(message, llama31_calls) for message in messages]
    if not tools:
        return plain
    system, rest = split_system(plain, default_system)
    first_user = next((index for index, message in enumerate(rest) if message["role"] == "user"), None)
    if first_user is None:
        raise InvalidRequestError("Llama 3.1's format puts the tools in the first user message, and the "
                                  "conversation has none.", "messages")
    listed = "".join(json.dumps(tool, indent=4, ensure_ascii=False) + "\n\n" for tool in tools)
    rest[first_user] = {"role": "user", "content": f"{_LLAMA31_TOOLS}{listed}{message_text(rest[first_user])}"}
    return [{"role": "system", "content": f"Environment: ipython\n{system or ''}"}, *rest]


def hermes_calls(content: str, calls: list[tuple[str, dict]]) -> str:
    blocks = [f"<tool_call>\n{json.dumps({'name': name, 'arguments': arguments}, ensure_ascii=False)}\n</tool_call>"
              for name, arguments in calls]
    return "\n".join([content, *blocks] if content else blocks)


def internlm2_calls(content: str, calls: list[tuple[str, dict]]) -> str:
    return content + "".join(
        f"<|action_start|><|plugin|>\n{json.dumps({'name': name, 'parameters': arguments}, ensure_ascii=False)}"
        "<|action_end|>" for name, arguments in calls)


def llama31_calls(content: str, calls: list[tuple[str, dict]]) -> str:
    return content + "<|python_tag|>" + "; ".join(
        json.dumps({"name": name, "parameters": arguments}, ensure_ascii=False) for name, arguments in calls)


def with_calls_as_text(message: Message, write) -> Message:
    if not message.get("tool_calls"):
        return message
    calls = [tool_call_parts(call) for call in message["tool_calls"]]
    return {"role": message["role"], "content": write(message_text(message), calls)}


def split_system(messages: list[Message], default_system: str | None) -> tuple[str | None, list[Message]]:
    """The system text (the first message's, else the default) and the other messages."""
    if messages and messages[0]["role"] == "system":
        return message_text(messages[0]), messages[1:]
    return default_system, messages


def function_of(tool: dict) -> dict:
    """The function of an OpenAI tool ``{"type": "function", "function": {...}}``."""
    return tool.get("function", tool) if isinstance(tool, dict) else tool


def message_text(message: Message) -> str:
    return message.get("content") or ""
