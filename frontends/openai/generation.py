"""One chat or completions request: its choices, run through the bus, as one
JSON body or as a stream of server-sent events.

A request has one or more prompts (completions may send a list) and ``n``
choices per prompt; every choice is its own generation on the bus, run
concurrently. Choice ``index`` = prompt index * n + choice number. Usage counts
each prompt once and every choice's completion tokens.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass, field
from typing import Sequence

from sanic import Request
from sanic.response import json as json_response

from lmserve.core.types import (
    FinishReason,
    GenerationOutput,
    GenerationRequest,
    InvalidRequestError,
    SamplingParams,
    TokenLogprob,
)
from lmserve.core.tool_calls import ToolCall, ToolCallDelta, ToolParser
from lmserve.core.validation import check_context_room, check_token_ids
from lmserve.frontends.openai.cuts import end_cut_stream
from lmserve.frontends.openai.errors import APIError, error_response
from lmserve.frontends.openai.logprobs import LogprobsFormatter
from lmserve.frontends.openai.sampling import (
    checked_stop_strings,
    sampling_params,
    with_template_stop_strings,
    with_template_stop_token_ids,
)
from lmserve.frontends.openai.sse import SSE_CONTENT_TYPE, SSE_DONE, sse_cut_ending, sse_error, sse_event
from lmserve.frontends.openai.structured_output import output_constraint, request_grammar
from lmserve.frontends.openai.tool_use import ToolUse
from lmserve.frontends.openai.state import ServerState


#: Bounds on the work one request may ask for (its choices share one admission slot).
MAX_CHOICES = 256
#: The finish_reason of a choice that ended by calling tools.
TOOL_CALLS = "tool_calls"


@dataclass
class Choice:
    index: int
    request: GenerationRequest
    echo: str = ""  # text put before the generated text (completions' echo)
    #: Reads tool calls out of the text (a chat request with tools).
    tool_parser: ToolParser | None = None
    called_tools: bool = False  # a tool-call delta was streamed
    text: list[str] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    prompt_logprobs: tuple[TokenLogprob | None, ...] | None = None
    last: GenerationOutput | None = None

    @property
    def text_length(self) -> int:
        return len(self.echo) + sum(len(piece) for piece in self.text)


class Generation:
    """Validates a parsed chat/completions body into choices, then answers it."""

    def __init__(self, state: ServerState, body, prompts: Sequence[Sequence[int]], *, chat: bool,
                 echo_texts: Sequence[str] | None = None, tools: ToolUse | None = None):
        self.state = state
        self.body = body
        self.chat = chat
        self.tools = tools or ToolUse()
        self.prompts = [list(prompt) for prompt in prompts]
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.object = "chat.completion" if chat else "text_completion"
        self.formatter = LogprobsFormatter(state.tokenizer, body.skip_special_tokens)
        self.choices = self._choices(echo_texts)

    # ----------------------------------------------------------------- validation

    def _choices(self, echo_texts: Sequence[str] | None) -> list[Choice]:
        body, state = self.body, self.state
        # max_completion_tokens wins; errors name the field the client sent.
        if body.max_completion_tokens is not None:
            requested, requested_param = body.max_completion_tokens, "max_completion_tokens"
        else:
            requested, requested_param = body.max_tokens, "max_tokens"
        if requested is not None and requested < 1:
            raise APIError(400, f"{requested_param} must be at least 1, got {requested}.", requested_param)
        if body.stream_options is not None and not body.stream:
            raise APIError(400, "stream_options is only allowed when stream is true.", "stream_options")
        grammar, grammar_param = request_grammar(body.response_format, self.tools)
        vocab_size = state.tokenizer.vocab_size
        bad = [token for token in (body.logit_bias or {})
               if not (token.isascii() and token.isdigit() and int(token) < vocab_size)]
        if bad:
            raise APIError(400, f"logit_bias key {bad[0]!r} is not a token id of this model.", "logit_bias")
        check_token_ids(body.stop_token_ids or (), vocab_size, "stop_token_ids")
        if len(self.prompts) * body.n > MAX_CHOICES:
            raise APIError(400, f"A request may ask for at most {MAX_CHOICES} choices (prompts x n), "
                           f"got {len(self.prompts)} x {body.n}.", "n" if body.n > 1 else "prompt")
        logprobs, logprobs_param = self._logprobs_request()
        stop = checked_stop_strings(body.stop)
        stop_token_ids = with_template_stop_token_ids(state, tuple(body.stop_token_ids or ()),
                                                      ignore_eos=body.ignore_eos)
        if self.chat:  # a completion's prompt is not the template's, nor are its stop words
            stop = with_template_stop_strings(state, stop, ignore_eos=body.ignore_eos)

        choices = []
        for prompt_index, prompt in enumerate(self.prompts):
            try:
                max_tokens = check_context_room(len(prompt), requested, state.max_model_len,
                                                prompt_param="messages" if self.chat else "prompt")
            except InvalidRequestError as exc:
                param = requested_param if exc.param == "max_tokens" else exc.param
                raise APIError(400, exc.message.replace("max_tokens", requested_param), param) from exc
            for number in range(body.n):
                params = self._sampling_params(max_tokens, logprobs, logprobs_param, stop_token_ids, number)
                constraint = None if grammar is None else output_constraint(state, grammar, grammar_param)
                request = GenerationRequest(tuple(prompt), params, stop=stop,
                                            include_stop_str_in_output=body.include_stop_str_in_output,
                                            constraint=constraint, group_id=self.id)
                echo = echo_texts[prompt_index] if echo_texts else ""
                parser = self.tools.new_parser() if self.tools.new_parser else None
                choices.append(Choice(prompt_index * body.n + number, request, echo, parser))
        return choices

    def _logprobs_request(self) -> tuple[int | None, str]:
        """(top alternatives wanted or None, the parameter that asked)."""
        body = self.body
        if self.chat:
            # LMDeploy's APIClient always sends top_logprobs=0: only a positive one needs logprobs.
            if body.top_logprobs and not body.logprobs:
                raise APIError(400, "top_logprobs needs logprobs=true.", "top_logprobs")
            return (body.top_logprobs or 0) if body.logprobs else None, "top_logprobs"
        return body.logprobs, "logprobs"

    def _sampling_params(self, max_tokens: int, logprobs: int | None, logprobs_param: str,
                         stop_token_ids: tuple[int, ...], number: int) -> SamplingParams:
        body = self.body
        return sampling_params(
            max_tokens,
            temperature=body.temperature,
            top_p=body.top_p,
            top_k=body.top_k,
            min_p=body.min_p,
            repetition_penalty=body.repetition_penalty,
            presence_penalty=body.presence_penalty,
            frequency_penalty=body.frequency_penalty,
            logit_bias=body.logit_bias,
            # Choice i of a seeded request uses seed + i: reproducible, and the choices differ.
            seed=None if body.seed is None else body.seed + number,
            stop_token_ids=stop_token_ids,
            ignore_eos=body.ignore_eos,
            # A tool parser whose markers are special tokens must see them.
            skip_special_tokens=body.skip_special_tokens and not self.tools.needs_special_tokens,
            min_tokens=body.min_tokens,
            logprobs=logprobs,
            # An echoed prompt comes with its tokens' logprobs too (as lm-eval's loglikelihood needs).
            prompt_logprobs=logprobs if not self.chat and body.echo else None,
            body_names={"logprobs": logprobs_param},
        )

    # -------------------------------------------------------------------- running

    async def respond(self, request: Request):
        if self.body.stream:
            return await self._stream(request)
        return await self._complete()

    async def _complete(self):
        async def run(choice: Choice) -> None:
            async for out in self.state.bus.generate(choice.request):
                choice.text.append(out.text)
                choice.logprobs.extend(out.logprobs or ())
                choice.prompt_logprobs = choice.prompt_logprobs or out.prompt_logprobs
                choice.last = out

        tasks = [asyncio.create_task(run(choice)) for choice in self.choices]
        try:
            await asyncio.gather(*tasks)
        finally:  # one choice failed or the client left: stop the others too
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        for choice in self.choices:
            if choice.last.finish_reason is FinishReason.ERROR:
                return error_response(500, choice.last.error or "The engine failed this request.")
        body = {
            "id": self.id,
            "object": self.object,
            "created": self.created,
            "model": self.state.model_name,
            "choices": [self._final_choice(choice) for choice in self.choices],
            "usage": self._usage(),
        }
        return json_response(body)

    def _final_choice(self, choice: Choice) -> dict:
        text = choice.echo + "".join(choice.text)
        body: dict = {"index": choice.index, "logprobs": None, "finish_reason": choice.last.finish_reason.value}
        wants_logprobs = choice.request.sampling_params.logprobs is not None
        if self.chat:
            body["message"] = {"role": "assistant", "content": text}
            if choice.tool_parser is not None:
                parsed = choice.tool_parser.parse(text)
                if parsed.tool_calls:
                    body["message"] = {"role": "assistant", "content": parsed.content or None,
                                       "tool_calls": [_tool_call(call) for call in parsed.tool_calls]}
                    if body["finish_reason"] == FinishReason.STOP.value:
                        body["finish_reason"] = TOOL_CALLS
            if wants_logprobs:
                body["logprobs"] = self.formatter.chat(choice.logprobs)
        else:
            body["text"] = text
            if wants_logprobs:
                body["logprobs"] = self.formatter.completion(choice.logprobs, len(choice.echo))
                if choice.prompt_logprobs is not None:
                    body["logprobs"] = self._with_prompt(choice, choice.prompt_logprobs, body["logprobs"])
        return body

    def _with_prompt(self, choice: Choice, prompt_logprobs, columns: dict) -> dict:
        """Completions' logprob columns of the echoed prompt, then ``columns``."""
        prompt = self.formatter.completion_prompt(choice.request.prompt_token_ids, prompt_logprobs)
        return {key: prompt[key] + columns[key] for key in prompt}

    async def _stream(self, request: Request):
        include_usage = bool(self.body.stream_options and self.body.stream_options.include_usage)
        events: asyncio.Queue[tuple[Choice, GenerationOutput | BaseException]] = asyncio.Queue()

        async def pump(choice: Choice) -> None:
            try:
                async for out in self.state.bus.generate(choice.request):
                    await events.put((choice, out))
            except Exception as exc:  # reported as an error event
                await events.put((choice, exc))

        tasks = [asyncio.create_task(pump(choice)) for choice in self.choices]
        try:
            # The headers go out with the first output: a backend of replicas has named the one
            # serving the request by then (its x-lmserve-replica header).
            first = await events.get()
            response = await request.respond(content_type=SSE_CONTENT_TYPE, headers={"Cache-Control": "no-cache"})
            for choice in self.choices:
                if self.chat:
                    await response.send(self._chunk(choice, {"role": "assistant", "content": ""}, None, include_usage))
                if choice.echo and choice.request.sampling_params.prompt_logprobs is None:
                    await response.send(self._chunk(choice, choice.echo, None, include_usage))
            unfinished = len(self.choices)
            while unfinished:
                choice, out = first if first is not None else await events.get()
                first = None
                if isinstance(out, BaseException) or out.finish_reason is FinishReason.ERROR:
                    message = str(out) if isinstance(out, BaseException) else out.error
                    await response.send(sse_error(500, message or "The engine failed this request."))
                    break
                choice.last = out
                if out.prompt_logprobs is not None and choice.echo:  # the echo waited for its logprobs
                    prompt = self._with_prompt(choice, out.prompt_logprobs, self.formatter.completion((), 0))
                    await response.send(self._chunk(choice, choice.echo, None, include_usage, columns=prompt))
                if out.text or out.logprobs:
                    delta = self._delta(choice, out.text)
                    await response.send(self._chunk(choice, delta, None, include_usage, out.logprobs))
                    choice.text.append(out.text)
                if out.finish_reason is not None:
                    if choice.tool_parser is not None:  # what the parser held back
                        content, calls = choice.tool_parser.flush()
                        if content or calls:
                            await response.send(self._chunk(choice, self._tool_delta(choice, content, calls),
                                                            None, include_usage))
                    finish_reason = out.finish_reason.value
                    if choice.called_tools and out.finish_reason is FinishReason.STOP:
                        finish_reason = TOOL_CALLS
                    # In a chunk of its own, as LMDeploy sends it.
                    final = {"role": "assistant", "content": ""} if self.chat else ""
                    await response.send(self._chunk(choice, final, finish_reason, include_usage))
                    unfinished -= 1
            else:
                if include_usage:
                    await response.send(sse_event({
                        "id": self.id, "object": self._chunk_object, "created": self.created,
                        "model": self.state.model_name, "choices": [], "usage": self._usage(),
                    }))
            await response.send(SSE_DONE)
            await response.eof()
        except asyncio.CancelledError:  # the server may have cut the request: the stream says why
            await end_cut_stream(request, sse_cut_ending)
            raise
        finally:  # a client gone, an error: stop every choice (their generators abort)
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    def _delta(self, choice: Choice, text: str):
        """A chunk's delta for new text: completions' text; chat's role and content, with
        the tool calls its parser found (content then holds only the text outside them)."""
        if not self.chat:
            return text
        if choice.tool_parser is None:
            return {"role": "assistant", "content": text}
        return self._tool_delta(choice, *choice.tool_parser.feed(text))

    def _tool_delta(self, choice: Choice, content: str, calls: Sequence[ToolCallDelta]) -> dict:
        delta: dict = {"role": "assistant", "content": content}
        if calls:
            choice.called_tools = True
            delta["tool_calls"] = [_tool_call_delta(call) for call in calls]
        return delta

    @property
    def _chunk_object(self) -> str:
        return "chat.completion.chunk" if self.chat else "text_completion"

    def _chunk(self, choice: Choice, delta, finish_reason: str | None, include_usage: bool,
               logprobs: Sequence[TokenLogprob] | None = None, columns: dict | None = None) -> str:
        """One event; ``columns``: completions' logprobs already formatted (the echoed prompt's)."""
        body: dict = {"index": choice.index, "logprobs": None, "finish_reason": finish_reason}
        if self.chat:
            body["delta"] = delta
            if logprobs is not None:
                body["logprobs"] = self.formatter.chat(logprobs)
        else:
            body["text"] = delta
            if columns is not None:
                body["logprobs"] = columns
            elif logprobs is not None:
                body["logprobs"] = self.formatter.completion(logprobs, choice.text_length)
        event = {"id": self.id, "object": self._chunk_object, "created": self.created,
                 "model": self.state.model_name, "choices": [body]}
        if include_usage:
            event["usage"] = None
        return sse_event(event)

    def _usage(self) -> dict:
        prompt_tokens = sum(len(prompt) for prompt in self.prompts)
        completion_tokens = sum(choice.last.usage.completion_tokens for choice in self.choices if choice.last)
        cached = sum(choice.last.usage.cached_tokens for choice in self.choices
                     if choice.last and choice.index % self.body.n == 0)
        return {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached},
        }


def _tool_call(call: ToolCall) -> dict:
    return {"id": call.id, "type": "function", "function": {"name": call.name, "arguments": call.arguments}}


def _tool_call_delta(call: ToolCallDelta) -> dict:
    """OpenAI's streamed call piece: id, type and name on a call's first piece only."""
    delta: dict = {"index": call.index}
    function: dict = {"arguments": call.arguments}
    if call.id is not None:
        delta["id"], delta["type"] = call.id, "function"
    if call.name is not None:
        function["name"] = call.name
    delta["function"] = function
    return delta
