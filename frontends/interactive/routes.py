"""``POST /v1/chat/interactive``: multi-turn chat whose history stays on the server.

Compatible with LMDeploy 0.9's endpoint and clients. A turn sends only its
new message; the server keeps the conversation (as token ids, and their keys
and values in the KV cache: :mod:`lmserve.core.sessions`), so the turn
computes only its own tokens. The first turn of a session is rendered through
the chat template whole; later turns render only the new messages
(:func:`~lmserve.core.chat_template.render_continuation`): no second system
prompt, no second BOS.

- ``session_id`` -1: a one-shot conversation; nothing is kept.
- ``interactive_mode`` true keeps the session after the turn; false ends it
  after the turn.
- ``prompt=""``, ``request_output_len=0``, ``interactive_mode=false`` ends a
  session without a turn; ``cancel=true`` stops its running turn.
- ``request_output_len=0`` with ``interactive_mode`` true adds the prompt to
  the history without generating (LMDeploy's web UI primes a session so).
- A second request while a turn runs gets a 409. A turn that would pass the
  session length gets ``finish_reason: "length"`` with what fitted (nothing,
  when the input itself does not fit).
- With ``--api-keys`` a session belongs to the key that opened it: another key's
  turn on the same ``session_id`` opens a session of its own, and its cancel or
  end is a 404, as for an id nobody holds (without keys both answer 200, as
  LMDeploy's do). ``POST /v1/sessions`` (:mod:`.sessions_route`) opens one
  under an id the server chose.
- A turn that would open more sessions than ``--max-sessions-per-client``, or
  pass ``--max-session-tokens-per-client``, gets a 429; a reply stops (``length``)
  where the token limit leaves no more room.

A stream is one JSON object per line (no ``data:`` prefix, no ``[DONE]``), as
LMDeploy's clients read it; ``text`` is the new text of each line.
"""

from __future__ import annotations

import asyncio

from sanic import HTTPResponse, Request, Sanic
from sanic.response import json as json_response

from lmserve.core import hookimpl
from lmserve.core.chat_template import render_continuation, render_messages
from lmserve.core.reasoning import ReasoningReader
from lmserve.core.sessions import Session, SessionBusyError, SessionLimitError, SessionLimits
from lmserve.core.types import FinishReason, GenerationOutput, GenerationRequest, SamplingParams
from lmserve.frontends.interactive.protocol import InteractiveRequest, InteractiveResponse
from lmserve.frontends.interactive.sessions_route import (
    no_such_session,
    register_session_routes,
    request_client,
    session_limits,
    too_many,
)
from lmserve.frontends.http.auth import request_owner
from lmserve.frontends.http.chat_prompt import chat_prompt_ids
from lmserve.frontends.http.cuts import end_cut_stream
from lmserve.frontends.http.errors import APIError, error_response
from lmserve.frontends.http.limits import admitted
from lmserve.frontends.http.openapi import RouteDoc
from lmserve.frontends.http.parsing import parse_body
from lmserve.frontends.http.sampling import (
    checked_stop_strings,
    sampling_params,
    with_template_stop_strings,
    with_template_stop_token_ids,
)
from lmserve.frontends.http.sse import one_line_json
from lmserve.frontends.http.state import ServerState
from lmserve.frontends.http.structured_output import compile_off_the_loop, output_constraint, output_grammar

NDJSON = "application/x-ndjson; charset=utf-8"

#: The route's entry in /openapi.json.
CHAT_INTERACTIVE_DOC = RouteDoc(
    "A turn of an interactive chat (LMDeploy)", "Interactive", InteractiveRequest, InteractiveResponse,
    line_stream=InteractiveResponse, errors=(400, 404, 408, 409, 413, 429, 500, 503, 504), admitted=True,
    description="The server keeps the conversation of `session_id` (its KV cache too), so each turn "
    "sends only its new message. With `stream: true` the answer is one `InteractiveResponse` JSON "
    "object per line (`text` is the new text). End a session with `prompt: \"\"`, "
    "`request_output_len: 0`, `interactive_mode: false`; stop a running turn with `cancel: true`. "
    "A turn on a session whose previous turn still runs gets a 409. With `--api-keys` a session belongs to "
    "the key that opened it: another key's turn with the same `session_id` opens a session of its own, and "
    "its cancel or end is a 404. A turn that would open more sessions than `--max-sessions-per-client`, or "
    "pass `--max-session-tokens-per-client`, gets a 429.",
    example={"prompt": "Hello! How are you?", "session_id": 1, "interactive_mode": True},
)


@hookimpl
def lmserve_register_routes(app: Sanic, state: ServerState) -> None:
    limits = session_limits(state)

    async def chat_interactive(request: Request):
        body = parse_body(request, InteractiveRequest)
        if body.image_url is not None:
            raise APIError(400, "image_url works with vision-language models only; this one reads text.",
                           "image_url")
        if body.adapter_name is not None:
            raise APIError(400, "This server has no LoRA adapters.", "adapter_name")
        sessions = state.bus.sessions
        owner = request_owner(request)
        if body.cancel:
            if body.session_id == -1:
                raise APIError(400, "Set the session_id of the turn to cancel.", "session_id")
            _check_held(state, owner, body.session_id)
            if sessions.cancel(body.session_id, owner=owner):
                await sessions.wait_idle(body.session_id, owner=owner)
            return _single_reply(body, _reply(finish_reason="stop"))
        if body.prompt == "" and body.request_output_len == 0 and not body.interactive_mode:
            if body.session_id != -1:
                _check_held(state, owner, body.session_id)
            if sessions.end(body.session_id, owner=owner):
                await sessions.wait_idle(body.session_id, owner=owner)  # a running turn winds down first
            return _single_reply(body, _reply(finish_reason="stop"))
        # Cancels and ends above never wait for admission; turns do (_turn is admitted).
        return await _turn(request, state, body, limits)

    app.add_route(chat_interactive, "/v1/chat/interactive", methods=["POST"], name="chat_interactive",
                  ctx_doc=CHAT_INTERACTIVE_DOC)
    register_session_routes(app, state)


def _check_held(state: ServerState, owner: str | None, session_id: int) -> None:
    """A 404 when the caller's key holds no session ``session_id`` (another key's is none of its
    business). Without keys nothing is refused: LMDeploy answers 200 to an unknown session."""
    if owner is not None and state.bus.sessions.get(session_id, owner=owner) is None:
        raise no_such_session(session_id)


@admitted
async def _turn(request: Request, state: ServerState, body: InteractiveRequest, limits: SessionLimits):
    """A turn: it waits for an admission slot and holds it while it generates."""
    sessions = state.bus.sessions
    if body.session_id == -1:
        session = None
    else:
        try:
            session = sessions.begin_turn(body.session_id, owner=request_owner(request),
                                          client=request_client(request), keep=body.interactive_mode,
                                          limits=limits)
        except SessionBusyError as exc:
            raise APIError(409, str(exc), "session_id") from exc
        except SessionLimitError as exc:
            raise too_many(exc) from exc
    try:
        history = session.history_tokens if session is not None else 0
        input_ids = _render_turn(state, session, body.prompt, body.template_kwargs())
        room = state.bus.context_room(history + len(input_ids))
        if body.request_output_len is not None and body.request_output_len < 0:
            raise APIError(400, f"request_output_len must be at least 0, got {body.request_output_len}.",
                           "request_output_len")
        reply_room = room if body.request_output_len is None else min(body.request_output_len, room)
        if session is not None and room > 0:
            try:  # the client's token limit: a 429, or less room for the reply
                reply_room = sessions.reserve_tokens(session, len(input_ids), reply_room, limits)
            except SessionLimitError as exc:
                raise too_many(exc) from exc
        if room <= 0 or reply_room <= 0:
            if session is not None:
                if room > 0 and body.request_output_len == 0 and body.interactive_mode:
                    session.token_ids.extend(input_ids)  # priming: the input joins the history
                    session.closing_token_id = None
                sessions.abandon_turn(session)
                if not body.interactive_mode:
                    sessions.end(session.session_id, owner=session.owner)
            return _single_reply(body, _reply(input_tokens=len(input_ids), history_tokens=history,
                                              finish_reason="length"))
        params = _sampling_params(state, body, reply_room)
        stop = with_template_stop_strings(state, checked_stop_strings(body.stop), ignore_eos=body.ignore_eos)
        grammar = output_grammar(body.response_format)
        await compile_off_the_loop(state, grammar, "response_format")
        constraint = None if grammar is None else output_constraint(state, grammar, "response_format")
    except BaseException:
        if session is not None:
            sessions.abandon_turn(session)
        raise

    if session is None:
        outputs = state.bus.generate(GenerationRequest(tuple(input_ids), params, stop=stop, constraint=constraint))
    else:
        outputs = sessions.run_turn(session, input_ids, params, keep=body.interactive_mode, stop=stop,
                                    constraint=constraint)
    counts = {"input_tokens": len(input_ids), "history_tokens": history}
    reasoning = ReasoningReader.for_prompt(state.reasoning_parser, state.tokenizer, input_ids,
                                           constrained=grammar is not None)
    if body.stream:
        return await _stream(request, outputs, counts, reasoning)
    return await _complete(outputs, counts, reasoning)


def _render_turn(state: ServerState, session: Session | None, prompt, template_kwargs: dict) -> list[int]:
    """The new turn's token ids: the whole template for a session's first turn,
    only the continuation for later turns; ``template_kwargs``: the turn's template variables."""
    if isinstance(prompt, str):
        messages = [{"role": "user", "content": prompt}]
    else:
        messages = [{"role": m.role, "content": m.text()} for m in prompt]
    if session is None or not session.token_ids:
        return chat_prompt_ids(state, messages, lambda messages: render_messages(
            state.chat_template, messages, add_generation_prompt=True, template_kwargs=template_kwargs))

    def continuation(messages: list[dict]) -> str:
        try:
            text = render_continuation(state.chat_template, messages, template_kwargs=template_kwargs)
        except ValueError as exc:
            raise APIError(400, str(exc), "prompt") from exc
        if session.closing_token_id is not None:
            # The reply ended on its stop token: the end-of-turn mark the template
            # writes after a reply is already in the history.
            closing = state.tokenizer.decode([session.closing_token_id])
            if closing and text.startswith(closing):
                text = text[len(closing):]
        return text

    return chat_prompt_ids(state, messages, continuation)


def _sampling_params(state: ServerState, body: InteractiveRequest, max_tokens: int) -> SamplingParams:
    """The turn's sampling; the body has no penalties over the output, ``logit_bias`` or logprobs
    (their defaults), and no stop token ids of its own: the template's only."""
    # A reasoning parser whose tags are special tokens must see them.
    return sampling_params(body, max_tokens, body_names={"min_tokens": "min_new_tokens"},
                           stop_token_ids=with_template_stop_token_ids(state, (), ignore_eos=body.ignore_eos),
                           skip_special_tokens=body.skip_special_tokens and not state.reasoning_keeps_special_tokens)


def _reply(text: str = "", tokens: int = 0, input_tokens: int = 0, history_tokens: int = 0,
           finish_reason: str | None = None, error: str | None = None, reasoning: str | None = None) -> dict:
    """A reply or stream line; ``reasoning``: its reasoning text, when the server splits it (None: it does not)."""
    reply = {"text": text, "tokens": tokens, "input_tokens": input_tokens, "history_tokens": history_tokens,
             "finish_reason": finish_reason}
    if reasoning is not None:
        reply["reasoning_content"] = reasoning
    if error is not None:
        reply["error"] = error
    return reply


def _single_reply(body: InteractiveRequest, reply: dict) -> HTTPResponse:
    """A reply without generation: one JSON line when a stream was asked for."""
    if body.stream:
        return HTTPResponse(_line(reply), content_type=NDJSON)
    return json_response(reply)


def _line(reply: dict) -> str:
    return one_line_json(reply, separators=(", ", ": ")) + "\n"


def _finish_name(out: GenerationOutput) -> str | None:
    return None if out.finish_reason is None else out.finish_reason.value


async def _complete(outputs, counts: dict, reasoning: ReasoningReader | None):
    text: list[str] = []
    last = None
    async for out in outputs:
        text.append(out.text)
        last = out
    if last.finish_reason is FinishReason.ERROR:
        return error_response(500, last.error or "The engine failed this turn.")
    thought = None
    if reasoning is not None:
        thought, content = reasoning.parser.parse("".join(text))
        text = [content]
    return json_response(_reply("".join(text), last.usage.completion_tokens, finish_reason=_finish_name(last),
                                reasoning=thought, **counts))


async def _stream(request: Request, outputs, counts: dict, reasoning: ReasoningReader | None):
    try:
        # The headers go out with the first output: a refusal before it is still a status,
        # and a backend of replicas has named the one serving the turn by then.
        first = await anext(outputs)
    except BaseException:
        await outputs.aclose()
        raise
    response = await request.respond(content_type=NDJSON, headers={"Cache-Control": "no-cache"})
    tokens = 0
    try:
        async for out in _prepend(first, outputs):
            error = None
            if out.finish_reason is FinishReason.ERROR:
                error = out.error or "The engine failed this turn."
            tokens = out.usage.completion_tokens
            thought, text = _split(reasoning, out)
            if text or thought or out.finish_reason is not None:  # nothing while a tag is undecided
                line = _reply(text, tokens, finish_reason=_finish_name(out), error=error, reasoning=thought, **counts)
                await response.send(_line(line))
        await response.eof()
    except asyncio.CancelledError:  # the server may have cut the turn (response timeout, shutdown): say why
        await end_cut_stream(request, lambda error: _line(_reply(
            tokens=tokens, finish_reason="error", error=error.message, **counts)))
        raise
    finally:
        await outputs.aclose()  # a client gone: the turn stops (and keeps what it sent)


def _split(reasoning: ReasoningReader | None, out: GenerationOutput) -> tuple[str | None, str]:
    """A stream line's ``(reasoning, text)``: the output's text split, all of it after
    the last output; the reasoning None when the server does not split it."""
    if reasoning is None:
        return None, out.text
    thought, text = reasoning.feed(out.text, len(out.token_ids))
    if out.finish_reason is not None:
        more_thought, more_text = reasoning.flush()
        thought, text = thought + more_thought, text + more_text
    return thought, text


async def _prepend(first, outputs):
    yield first
    async for out in outputs:
        yield out
