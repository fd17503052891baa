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
from typing import Sequence

from sanic import Request
from sanic.response import json as json_response

from lmserve.core.reasoning import ReasoningReader
from lmserve.core.structured_output import OutputGrammar
from lmserve.core.tool_calls import ParsedToolCall, ParsedToolCallDelta
from lmserve.core.types import (
    FinishReason,
    GenerationOutput,
    GenerationRequest,
    InvalidRequestError,
    SamplingParams,
    TokenLogprob,
)
from lmserve.core.validation import check_logit_bias_keys, check_token_ids
from lmserve.frontends.http.choice import Choice
from lmserve.frontends.http.cuts import end_cut_stream
from lmserve.frontends.http.errors import APIError, error_response
from lmserve.frontends.http.logprobs import LogprobsFormatter
from lmserve.frontends.http.sampling import (
    checked_stop_strings,
    sampling_params,
    with_template_stop_strings,
    with_template_stop_token_ids,
)
from lmserve.frontends.http.sse import SSE_CONTENT_TYPE, SSE_DONE, sse_cut_ending, sse_error, sse_event
from lmserve.frontends.http.structured_output import output_constraint
from lmserve.frontends.http.tool_use import ToolUse
from lmserve.frontends.http.state import ServerState


#: Bounds on the work one request may ask for (its choices share one admission slot).
MAX_CHOICES = 256
#: The finish_reason of a choice that ended by calling tools.
TOOL_CALLS = "tool_calls"


class GenerationHandler:
    """Validates a parsed chat/completions body into choices, then answers it.

    ``grammar`` is the request's output grammar and ``grammar_param`` the parameter that
    asked for it, as the route computed them once
    (:func:`~lmserve.frontends.http.structured_output.request_grammar`) and compiled
    them off the event loop; None: free text.
    """

    def __init__(self, state: ServerState, body, prompts: Sequence[Sequence[int]], *, chat: bool,
                 grammar: OutputGrammar | None, grammar_param: str, echo_texts: Sequence[str] | None = None,
                 tools: ToolUse | None = None):
        self.state = state
        self.body = body
        self.chat = chat
        self.tools = tools or ToolUse()
        self.grammar, self.grammar_param = grammar, grammar_param
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
        if requested is None:  # the model's default (max_new_tokens), else all the room left
            requested = state.sampling_defaults.values.get("max_tokens")
        if requested is not None and requested < 1:
            raise APIError(400, f"{requested_param} must be at least 1, got {requested}.", requested_param)
        if body.stream_options is not None and not body.stream:
            raise APIError(400, "stream_options is only allowed when stream is true.", "stream_options")
        vocab_size = state.tokenizer.vocab_size
        check_logit_bias_keys(body.logit_bias or (), vocab_size)
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
                max_tokens = state.bus.check_length(len(prompt), requested,
                                                    prompt_param="messages" if self.chat else "prompt")
            except InvalidRequestError as exc:
                param = requested_param if exc.param == "max_tokens" else exc.param
                raise APIError(400, exc.message.replace("max_tokens", requested_param), param) from exc
            for number in range(body.n):
                params = self._sampling_params(max_tokens, logprobs, logprobs_param, stop_token_ids, number)
                constraint = None if self.grammar is None else output_constraint(state, self.grammar,
                                                                                  self.grammar_param)
                request = GenerationRequest(tuple(prompt), params, stop=stop,
                                            include_stop_str_in_output=body.include_stop_str_in_output,
                                            constraint=constraint, group_id=self.id)
                echo = echo_texts[prompt_index] if echo_texts else ""
                parser = self.tools.new_parser() if self.tools.new_parser else None
                reasoning = ReasoningReader.for_prompt(state.reasoning_parser, state.tokenizer, prompt,
                                                       constrained=self.grammar is not None) if self.chat else None
                choices.append(Choice(prompt_index * body.n + number, request, echo, parser, reasoning=reasoning))
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
        """Choice ``number``'s sampling: the body's values, but for what the request as a whole decided."""
        body = self.body
        return sampling_params(
            body, max_tokens,
            # Choice i of a seeded request uses seed + i: reproducible, and the choices differ.
            seed=None if body.seed is None else body.seed + number,
            stop_token_ids=stop_token_ids,
            # A tool or reasoning parser whose markers are special tokens must see them.
            skip_special_tokens=body.skip_special_tokens and not self.tools.needs_special_tokens
            and not (self.chat and self.state.reasoning_keeps_special_tokens),
            logprobs=logprobs,
            # An echoed prompt comes with its tokens' logprobs too (as lm-eval's loglikelihood needs).
            prompt_logprobs=logprobs if not self.chat and body.echo else None,
            body_names={"logprobs": logprobs_param},
            defaults=self.state.sampling_defaults.values,
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
                choice.split(out)
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
            body["message"] = self._message(choice, text)
            if "tool_calls" in body["message"] and body["finish_reason"] == FinishReason.STOP.value:
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

    def _message(self, choice: Choice, text: str) -> dict:
        """A chat choice's whole answer: the reasoning (null when none) apart, when the server
        splits it; then the tool calls read from the content, the content outside them."""
        message: dict = {"role": "assistant", "content": text}
        if choice.reasoning is not None:
            choice.split(None)
            message["content"] = "".join(choice.content_text)
        if choice.tool_parser is not None:
            parsed = choice.tool_parser.parse(message["content"])
            if parsed.tool_calls:
                message["content"] = parsed.content or None
                message["tool_calls"] = [_tool_call(call) for call in parsed.tool_calls]
        if choice.reasoning is not None:
            message["reasoning_content"] = "".join(choice.reasoning_text) or None
            if message["reasoning_content"] and not message["content"]:
                message["content"] = None  # all reasoning, as LMDeploy answers it
        return message

    def _with_prompt(self, choice: Choice, prompt_logprobs, columns: dict) -> dict:
        """Completions' logprob columns of the echoed prompt, then ``columns``."""
        prompt = self.formatter.completion_prompt(choice.request.prompt_token_ids, prompt_logprobs)
        return {key: prompt[key] + columns[key] for key in prompt}

    async def _stream(self, request: Request):
        """Answer as server-sent events: the pump runs every choice on the bus and the loop
        sends their outputs as they come, in one stream (see the ``_send_*`` steps)."""
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
            await self._send_opening(response)
            unfinished = len(self.choices)
            while unfinished:
                choice, out = first if first is not None else await events.get()
                first = None
                failure = _failure(out)
                if failure is not None:
                    await response.send(sse_error(500, failure))
                    break
                await self._send_delta(response, choice, out)
                if out.finish_reason is not None:
                    await self._send_finish(response, choice, out)
                    unfinished -= 1
            else:
                await self._send_usage(response)
            await response.send(SSE_DONE)
            await response.eof()
        except asyncio.CancelledError:  # the server may have cut the request: the stream says why
            await end_cut_stream(request, sse_cut_ending)
            raise
        finally:  # a client gone, an error: stop every choice (their generators abort)
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _send_opening(self, response) -> None:
        """What every choice starts with: chat's assistant role; completions' echoed prompt,
        unless it waits for its prompt logprobs (:meth:`_send_delta` sends it then)."""
        for choice in self.choices:
            if self.chat:
                await response.send(self._chunk(choice, {"role": "assistant", "content": ""}, None))
            if choice.echo and choice.request.sampling_params.prompt_logprobs is None:
                await response.send(self._chunk(choice, choice.echo, None))

    async def _send_delta(self, response, choice: Choice, out: GenerationOutput) -> None:
        """One output's new text (and logprobs); the echo that waited for its prompt logprobs first."""
        choice.last = out
        if out.prompt_logprobs is not None and choice.echo:
            prompt = self._with_prompt(choice, out.prompt_logprobs, self.formatter.completion((), 0))
            await response.send(self._chunk(choice, choice.echo, None, columns=prompt))
        reasoning, text = choice.split(out)
        if out.text or out.logprobs:
            delta = self._delta(choice, text, reasoning)
            # A reasoning parser holding back what may begin a tag sends nothing yet.
            if out.logprobs or choice.reasoning is None or reasoning or text or "tool_calls" in delta:
                await response.send(self._chunk(choice, delta, None, out.logprobs))
            choice.text.append(out.text)

    async def _send_finish(self, response, choice: Choice, out: GenerationOutput) -> None:
        """A choice's end: what its reasoning and tool parsers held back, then its finish reason
        (``tool_calls`` for one that called tools and stopped), in a chunk of its own as LMDeploy sends it."""
        reasoning, content = choice.split(None)
        calls: list[ParsedToolCallDelta] = []
        if choice.tool_parser is not None:
            fed, fed_calls = choice.tool_parser.feed(content)
            held, held_calls = choice.tool_parser.flush()
            content, calls = fed + held, [*fed_calls, *held_calls]
        if reasoning or content or calls:
            delta = self._tool_delta(choice, content, calls)
            if reasoning:
                delta["reasoning_content"] = reasoning
            await response.send(self._chunk(choice, delta, None))
        finish_reason = out.finish_reason.value
        if choice.called_tools and out.finish_reason is FinishReason.STOP:
            finish_reason = TOOL_CALLS
        final = {"role": "assistant", "content": ""} if self.chat else ""
        await response.send(self._chunk(choice, final, finish_reason))

    async def _send_usage(self, response) -> None:
        """The usage of the whole request, after every choice finished, when the client asked."""
        if self._include_usage:
            await response.send(sse_event({
                "id": self.id, "object": self._chunk_object, "created": self.created,
                "model": self.state.model_name, "choices": [], "usage": self._usage(),
            }))

    def _delta(self, choice: Choice, text: str, reasoning: str = ""):
        """A chunk's delta for new text: completions' text; chat's role and content, with
        the tool calls its parser found (content then holds only the text outside them), and
        the new reasoning apart (``reasoning_content``) when the server splits it."""
        if not self.chat:
            return text
        if choice.tool_parser is None:
            delta = {"role": "assistant", "content": text}
        else:
            delta = self._tool_delta(choice, *choice.tool_parser.feed(text))
        if reasoning:
            delta["reasoning_content"] = reasoning
        return delta

    def _tool_delta(self, choice: Choice, content: str, calls: Sequence[ParsedToolCallDelta]) -> dict:
        delta: dict = {"role": "assistant", "content": content}
        if calls:
            choice.called_tools = True
            delta["tool_calls"] = [_tool_call_delta(call) for call in calls]
        return delta

    @property
    def _chunk_object(self) -> str:
        return "chat.completion.chunk" if self.chat else "text_completion"

    @property
    def _include_usage(self) -> bool:
        """Whether the stream carries usage: ``null`` in every chunk, the totals in an event at the end."""
        return bool(self.body.stream_options and self.body.stream_options.include_usage)

    def _chunk(self, choice: Choice, delta, finish_reason: str | None,
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
        if self._include_usage:
            event["usage"] = None
        return sse_event(event)

    def _usage(self) -> dict:
        prompt_tokens = sum(len(prompt) for prompt in self.prompts)
        completion_tokens = sum(choice.last.usage.completion_tokens for choice in self.choices if choice.last)
        cached = sum(choice.last.usage.cached_tokens for choice in self.choices
                     if choice.last and choice.index % self.body.n == 0)
        usage = {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached},
        }
        if self.chat and self.state.reasoning_parser is not None:
            reasoning = sum(choice.reasoning.reasoning_tokens for choice in self.choices if choice.reasoning)
            usage["completion_tokens_details"] = {"reasoning_tokens": reasoning}
        return usage


def _failure(out: GenerationOutput | BaseException) -> str | None:
    """Why a choice failed (its message, for an error event), or None when it goes on."""
    if isinstance(out, BaseException):
        return str(out) or "The engine failed this request."
    if out.finish_reason is FinishReason.ERROR:
        return out.error or "The engine failed this request."
    return None


def _tool_call(call: ParsedToolCall) -> dict:
    return {"id": call.id, "type": "function", "function": {"name": call.name, "arguments": call.arguments}}


def _tool_call_delta(call: ParsedToolCallDelta) -> dict:
    """OpenAI's streamed call piece: id, type and name on a call's first piece only."""
    delta: dict = {"index": call.index}
    function: dict = {"arguments": call.arguments}
    if call.id is not None:
        delta["id"], delta["type"] = call.id, "function"
    if call.name is not None:
        function["name"] = call.name
    delta["function"] = function
    return delta
