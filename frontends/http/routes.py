"""The OpenAI routes: /v1/models, /v1/chat/completions, /v1/completions, /health
(and, from tokenization.py, /v1/encode, /tokenize, /detokenize).

Registered through :hook:`lmserve_register_routes`, like a plugin's routes. The two
generation routes are declared :func:`~lmserve.frontends.http.limits.admitted`.
"""

from __future__ import annotations

import time

from sanic import Request, Sanic
from sanic.response import json as json_response

from lmserve.core import hookimpl
from lmserve.core.chat_template import render_chat
from lmserve.core.validation import check_token_ids
from lmserve.frontends.http.auth import request_owner
from lmserve.frontends.http.chat_prompt import chat_prompt_ids
from lmserve.frontends.http.errors import APIError, error_response
from lmserve.frontends.http.generation import GenerationHandler
from lmserve.frontends.http.limits import admitted
from lmserve.frontends.http.parsing import parse_body
from lmserve.frontends.http.protocol import ChatCompletionRequest, CompletionRequest
from lmserve.frontends.http.served_model import check_model
from lmserve.frontends.http.state import ServerState
from lmserve.frontends.http.tokenization import register_tokenization_routes
from lmserve.frontends.http.structured_output import compile_off_the_loop, request_grammar
from lmserve.frontends.http.tool_use import ToolUse, tool_use


@hookimpl(tryfirst=True)
def lmserve_register_routes(app: Sanic, state: ServerState) -> None:
    async def models(request: Request):
        return json_response(
            {
                "object": "list",
                "data": [
                    {
                        "id": state.model_name,
                        "object": "model",
                        "created": int(time.time()),
                        "owned_by": "lmserve",
                        "root": state.model_name,
                        "max_model_len": state.max_model_len,
                        # What a request that leaves these unset gets (--generation-config).
                        "sampling_defaults": dict(state.sampling_defaults.values),
                    }
                ],
            }
        )

    async def health(request: Request):
        if state.bus.backend.is_healthy():
            return json_response({"status": "ok"})
        return error_response(503, "The engine is not running.", retry_after=5)

    @admitted
    async def chat_completions(request: Request):
        body = parse_body(request, ChatCompletionRequest)
        check_model(state, body.model)
        _check_session_free(state, request, body.session_id)
        tools = tool_use(body, state.tool_parser, state.json_tool_parser)
        template_kwargs = body.template_kwargs()
        if isinstance(body.messages, str):  # a raw prompt
            prompt_ids = state.tokenizer.encode(body.messages)
        elif not body.do_preprocess:  # LMDeploy: the messages' texts, no template
            prompt_ids = state.tokenizer.encode("".join(m.text() for m in body.messages))
        else:
            prompt_ids = chat_prompt_ids(state, [m.for_template() for m in body.messages], lambda messages: render_chat(
                state.chat_template, messages, add_generation_prompt=True, tools=tools.template_tools,
                template_kwargs=template_kwargs))
        return await _generate(request, state, body, [prompt_ids], chat=True, tools=tools)

    @admitted
    async def completions(request: Request):
        body = parse_body(request, CompletionRequest)
        check_model(state, body.model)
        _check_session_free(state, request, body.session_id)
        prompts = _completion_prompts(state, body.prompt)
        echo_texts = None
        if body.echo:
            echo_texts = [text if isinstance(text, str) else state.tokenizer.decode(text)
                          for text in _prompt_list(body.prompt)]
        return await _generate(request, state, body, prompts, chat=False, echo_texts=echo_texts)

    app.add_route(models, "/v1/models", methods=["GET"], name="models")
    app.add_route(health, "/health", methods=["GET"], name="health")
    app.add_route(chat_completions, "/v1/chat/completions", methods=["POST"], name="chat_completions")
    app.add_route(completions, "/v1/completions", methods=["POST"], name="completions")
    register_tokenization_routes(app, state)


# ------------------------------------------------------------------------ helpers


async def _generate(request: Request, state: ServerState, body, prompts: list[list[int]], *, chat: bool,
                    tools: ToolUse | None = None, echo_texts: list[str] | None = None):
    """Answer a generation request: its output grammar is worked out here, once, and compiled
    off the event loop (a grammar error comes before the handler's own validation errors)."""
    grammar, grammar_param = request_grammar(body.response_format, tools)
    await compile_off_the_loop(state, grammar, grammar_param)
    handler = GenerationHandler(state, body, prompts, chat=chat, tools=tools, echo_texts=echo_texts,
                                grammar=grammar, grammar_param=grammar_param)
    return await handler.respond(request)


def _check_session_free(state: ServerState, request: Request, session_id: int | None) -> None:
    """A 409 when ``session_id`` is a live interactive session of the caller (with API keys, only
    its own key's: another key's sessions are none of its business, not even whether they exist)."""
    if session_id is not None and state.bus.sessions.is_live(session_id, owner=request_owner(request)):
        raise APIError(409, f"session_id {session_id} is a live interactive session: continue it through "
                       "/v1/chat/interactive, end it there, or use another session_id.", "session_id")


def _prompt_list(prompt) -> list:
    """A completions ``prompt`` as a list of prompts (each a string or token ids)."""
    if isinstance(prompt, str):
        return [prompt]
    if prompt and isinstance(prompt[0], int):
        return [prompt]
    return list(prompt)


def _completion_prompts(state: ServerState, prompt) -> list[list[int]]:
    prompts = _prompt_list(prompt)
    if not prompts:
        raise APIError(400, "prompt must not be an empty list.", "prompt")
    result = []
    for item in prompts:
        ids = state.tokenizer.encode(item) if isinstance(item, str) else list(item)
        if not ids:
            raise APIError(400, "The prompt is empty: nothing to generate from.", "prompt")
        check_token_ids(ids, state.tokenizer.vocab_size, "prompt")
        result.append(ids)
    return result
