"""An example lmserve plugin: one module that contributes four things.

- a chat template named ``hello``, chosen with ``--chat-template hello``;
- a route, ``GET /hello``, answering with the served model's name;
- a request observer that writes one JSON line per finished request (id,
  token counts, finish reason, latency) to the file given by ``--hello-log``,
  or to stderr;
- a model family, "hello" (``lmserve_hello_family.py``): checkpoints whose
  architecture is ``HelloForCausalLM`` load and serve.

lmserve finds it through the ``lmserve`` entry point in ``pyproject.toml``;
every function below marked with ``hookimpl`` implements the hook of the same
name (see lmserve's docs/plugins.md).
"""

from __future__ import annotations

import json
import sys
from typing import Sequence, TextIO

from lmserve import SERVE_API_SERVER, InvalidRequestError, hookimpl

# ------------------------------------------------------------------- chat template


class HelloChatTemplate:
    """A Markdown-ish transcript: a ``### Role:`` header above each message.

    ``matches`` is false for every model, so the template is never picked by a
    model's name: only ``--chat-template hello`` chooses it.
    """

    name = "hello"
    stop_words = ("### User:",)
    HEADERS = {"system": "### System:", "user": "### User:", "assistant": "### Hello:"}

    def render(self, messages: Sequence[dict], add_generation_prompt: bool = True) -> str:
        parts = []
        for message in messages:
            header = self.HEADERS.get(message["role"])
            if header is None:
                raise InvalidRequestError(
                    f"The hello template knows the roles {', '.join(self.HEADERS)}, not {message['role']!r}.",
                    "messages")
            parts.append(f"{header}\n{message['content']}\n\n")
        if add_generation_prompt:
            parts.append(self.HEADERS["assistant"] + "\n")
        return "".join(parts)

    def matches(self, model_name: str) -> bool:
        return False


@hookimpl
def lmserve_chat_templates():
    return [HelloChatTemplate()]


# --------------------------------------------------------------------------- route


@hookimpl
def lmserve_register_routes(app, state):
    from sanic.response import json as json_response

    async def hello(request):
        return json_response({"hello": "world", "model": state.model_name})

    app.add_route(hello, "/hello", methods=["GET"])


# --------------------------------------------------------------------- model family


@hookimpl
def lmserve_model_families():
    # Imported here: the family needs torch, and `lmserve plugins` should stay fast.
    from lmserve_hello_family import HelloFamily

    return [HelloFamily()]


# --------------------------------------------------------------- request observer

#: Where finished requests are logged; set by lmserve_configure from --hello-log.
_log: TextIO = sys.stderr


@hookimpl
def lmserve_add_cli_options(command, parser):
    if command == SERVE_API_SERVER:
        parser.add_argument("--hello-log", metavar="PATH", default=None,
                            help="Append one JSON line per finished request to PATH (default: stderr).")


@hookimpl
def lmserve_configure(config):
    global _log
    path = config.options.get("hello_log")
    # Line-buffered: each request's line is in the file as soon as it is written.
    _log = open(path, "a", buffering=1, encoding="utf-8") if path else sys.stderr


@hookimpl
def lmserve_request_finished(request, output, elapsed_s):
    record = {
        "request_id": request.request_id,
        "prompt_tokens": output.usage.prompt_tokens,
        "completion_tokens": output.usage.completion_tokens,
        "finish_reason": output.finish_reason.value if output.finish_reason else None,
        "latency_s": round(elapsed_s, 6),
    }
    _log.write(json.dumps(record) + "\n")


@hookimpl
def lmserve_shutdown():
    global _log
    if _log is not sys.stderr:
        _log.close()
        _log = sys.stderr
