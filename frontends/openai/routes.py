"""The OpenAI routes: /v1/models, /v1/chat/completions, /v1/completions, /health.

Registered through :hook:`lmserve_register_routes`, like a plugin's routes.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import AsyncIterator

import pydantic
from sanic import Request, Sanic
from sanic.response import json as json_response

from lmserve.core import hookimpl
from lmserve.core.types import (
    FinishReason,
    GenerationOutput,
    GenerationRequest,
    InvalidRequestError,
    SamplingParams,
)
from lmserve.frontends.openai.errors import APIError, error_response, sse_error, sse_event
from lmserve.frontends.openai.protocol import ChatCompletionRequest, CompletionRequest
from lmserve.frontends.openai.state import ServerState


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
                    }
                ],
            }
        )

    async def health(request: Request):
        if state.bus.backend.is_healthy():
            return json_response({"status": "ok"})
        return error_response(503, "The engine is not running.")

    async def chat_completions(request: Request):
        body = _parse(request, ChatCompletionRequest)
        _check_model(state, body.model)
        if isinstance(body.messages, str):
            prompt_ids = state.tokenizer.encode(body.messages)
        else:
            messages = [{"role": m.role, "content": m.text()} for m in body.messages]
            prompt = state.chat_template.render(messages, add_generation_prompt=True)
            prompt_ids = state.tokenizer.encode(prompt, add_bos=False)
        return await _generate(request, state, body, prompt_ids, chat=True)

    async def completions(request: Request):
        body = _parse(request, CompletionRequest)
        _check_model(state, body.model)
        if isinstance(body.prompt, str):
            prompt_ids = state.tokenizer.encode(body.prompt)
        else:
            prompt_ids = list(body.prompt)
            bad = [i for i in prompt_ids if not 0 <= i < state.tokenizer.vocab_size]
            if bad:
                raise APIError(400, f"Token id {bad[0]} is outside the vocabulary.", "prompt")
        if body.max_tokens is None and body.max_completion_tokens is None:
            body.max_tokens = 16  # OpenAI's default for completions
        return await _generate(request, state, body, prompt_ids, chat=False)

    app.add_route(models, "/v1/models", methods=["GET"], name="models")
    app.add_route(health, "/health", methods=["GET"], name="health")
    app.add_route(chat_completions, "/v1/chat/completions", methods=["POST"], name="chat_completions")
    app.add_route(completions, "/v1/completions", methods=["POST"], name="completions")


# ------------------------------------------------------------------------ helpers


def _parse(request: Request, model: type[pydantic.BaseModel]):
    content_type = (request.content_type or "").split(";")[0].strip().lower()
    if content_type != "application/json":
        raise APIError(400, "The body must be JSON: send Content-Type: application/json.")
    try:
        data = json.loads(request.body or b"")
    except (ValueError, UnicodeDecodeError) as exc:
        raise APIError(400, f"The body is not valid JSON: {exc}.") from exc
    if not isinstance(data, dict):
        raise APIError(400, "The body must be a JSON object.")
    try:
        return model.model_validate(data)
    except pydantic.ValidationError as exc:
        # The deepest error is the most specific one (a union tries every member).
        first = max(exc.errors(), key=lambda error: len(error["loc"]))
        param = ".".join(str(part) for part in first["loc"] if not _is_union_tag(part)) or None
        raise APIError(400, f"{param}: {first['msg']}" if param else first["msg"], param) from exc


def _is_union_tag(part) -> bool:
    """pydantic names the union member it tried (``str``, ``list[int]``, ``TextPart``) in ``loc``."""
    return isinstance(part, str) and (
        "[" in part or part[:1].isupper() or part in ("str", "int", "float", "bool", "none")
    )


def _check_model(state: ServerState, model: str) -> None:
    if model != state.model_name:
        raise APIError(404, f"The model '{model}' does not exist.", "model")


def _sampling_params(state: ServerState, body, max_tokens: int) -> SamplingParams:
    if body.n != 1:
        raise APIError(400, "Only n=1 is supported so far.", "n")
    if body.stop:
        raise APIError(400, "Stop strings are not supported yet; use stop_token_ids.", "stop")
    if body.stream_options is not None and not body.stream:
        raise APIError(400, "stream_options is only allowed when stream is true.", "stream_options")
    bad = [token for token in (body.logit_bias or {}) if not (token.isdigit() and int(token) < state.tokenizer.vocab_size)]
    if bad:
        raise APIError(400, f"logit_bias key {bad[0]!r} is not a token id of this model.", "logit_bias")
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=1.0 if body.temperature is None else body.temperature,
        top_p=1.0 if body.top_p is None else body.top_p,
        top_k=0 if body.top_k is None else body.top_k,
        min_p=0.0 if body.min_p is None else body.min_p,
        repetition_penalty=1.0 if body.repetition_penalty is None else body.repetition_penalty,
        presence_penalty=body.presence_penalty or 0.0,
        frequency_penalty=body.frequency_penalty or 0.0,
        logit_bias=body.logit_bias or {},
        seed=body.seed,
        # The template's stop words end a turn like EOS does; ignore_eos ignores both.
        stop_token_ids=() if body.ignore_eos else state.default_stop_token_ids,
        ignore_eos=body.ignore_eos,
        skip_special_tokens=body.skip_special_tokens,
    )


async def _generate(request: Request, state: ServerState, body, prompt_ids: list[int], *, chat: bool):
    requested = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    if requested is not None and requested < 1:
        raise APIError(400, f"max_tokens must be at least 1, got {requested}.", "max_tokens")
    try:
        max_tokens = state.bus.check_length(len(prompt_ids), requested)
        params = _sampling_params(state, body, max_tokens)
        generation = GenerationRequest(tuple(prompt_ids), params)
    except InvalidRequestError as exc:
        raise APIError(400, exc.message, exc.param) from exc
    prefix = "chatcmpl" if chat else "cmpl"
    response_id = f"{prefix}-{uuid.uuid4().hex}"
    outputs = state.bus.generate(generation)
    if body.stream:
        return await _stream(request, state, body, response_id, outputs, chat=chat)
    return await _complete(state, response_id, outputs, chat=chat)


async def _complete(state: ServerState, response_id: str, outputs: AsyncIterator[GenerationOutput], *, chat: bool):
    text = []
    last = None
    async for out in outputs:
        text.append(out.text)
        last = out
    assert last is not None
    if last.finish_reason is FinishReason.ERROR:
        return error_response(500, last.error or "The engine failed this request.")
    content = "".join(text)
    choice = {"index": 0, "logprobs": None, "finish_reason": last.finish_reason.value}
    if chat:
        choice["message"] = {"role": "assistant", "content": content}
    else:
        choice["text"] = content
    return json_response(
        {
            "id": response_id,
            "object": "chat.completion" if chat else "text_completion",
            "created": int(time.time()),
            "model": state.model_name,
            "choices": [choice],
            "usage": _usage(last),
        }
    )


async def _stream(request: Request, state: ServerState, body, response_id: str, outputs, *, chat: bool):
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    created = int(time.time())
    kind = "chat.completion.chunk" if chat else "text_completion"

    def chunk(delta_text: str | None, finish_reason: str | None, first: bool = False) -> str:
        choice: dict = {"index": 0, "logprobs": None, "finish_reason": finish_reason}
        if chat:
            delta = {"role": "assistant", "content": ""} if first else {}
            if delta_text:
                delta["content"] = delta_text
            choice["delta"] = delta
        else:
            choice["text"] = delta_text or ""
        event = {"id": response_id, "object": kind, "created": created, "model": state.model_name, "choices": [choice]}
        if include_usage:
            event["usage"] = None
        return sse_event(event)

    response = await request.respond(content_type="text/event-stream", headers={"Cache-Control": "no-cache"})
    if chat:
        await response.send(chunk(None, None, first=True))
    last = None
    async for out in outputs:
        last = out
        if out.finish_reason is FinishReason.ERROR:
            await response.send(sse_error(500, out.error or "The engine failed this request."))
            break
        if out.text:
            await response.send(chunk(out.text, None))
        if out.finish_reason is not None:
            await response.send(chunk(None, out.finish_reason.value))
    if include_usage and last is not None and last.finish_reason is not FinishReason.ERROR:
        event = {"id": response_id, "object": kind, "created": created, "model": state.model_name,
                 "choices": [], "usage": _usage(last)}
        await response.send(sse_event(event))
    await response.send("data: [DONE]\n\n")
    await response.eof()


def _usage(out: GenerationOutput) -> dict:
    return {
        "prompt_tokens": out.usage.prompt_tokens,
        "completion_tokens": out.usage.completion_tokens,
        "total_tokens": out.usage.total_tokens,
        "prompt_tokens_details": {"cached_tokens": out.usage.cached_tokens},
    }
