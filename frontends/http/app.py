"""Build the server: resolve the model through the hooks, then the Sanic app."""

from __future__ import annotations

import asyncio
import logging
import sys

import pluggy
from sanic import Request, Sanic
from sanic.exceptions import MethodNotAllowed, PayloadTooLarge, SanicException

from lmserve.core.bus import RequestBus
from lmserve.core.chat_template import render_chat
from lmserve.core.config import ServeConfig
from lmserve.core.plugins import call_safely
from lmserve.core.reasoning import choose_reasoning_parser, reasoning_choice_line
from lmserve.core.sampling_defaults import resolve_sampling_defaults
from lmserve.core.startup import make_backend, resolve_model
from lmserve.core.tool_calls import choose_tool_parser
from lmserve.core.types import BackendUnavailableError, InvalidRequestError, SessionLostError
from lmserve.frontends.http.auth import setup_auth
from lmserve.frontends.http.cors import setup_cors
from lmserve.frontends.http.cuts import setup_cuts
from lmserve.frontends.http.errors import APIError, error_response
from lmserve.frontends.http.http_config import HTTPConfig
from lmserve.frontends.http.limits import refuse_generation_flags, setup_limits
from lmserve.frontends.http.openapi import setup_openapi
from lmserve.frontends.http.shutdown import setup_graceful_shutdown
from lmserve.frontends.http.state import ServerState
from lmserve.frontends.http.timeouts import TimedSanic, setup_timeouts

logger = logging.getLogger(__name__)

#: Sanic's RESPONSE_TIMEOUT: a day, i.e. none a generation would reach.
NO_RESPONSE_TIMEOUT_S = 24 * 3600
#: Seconds cancelled handlers get to unwind at shutdown before the engine stops.
UNWIND_TIMEOUT_S = 2.0


def build_state(config: ServeConfig, pm: pluggy.PluginManager) -> ServerState:
    """Everything the routes need, built through the hooks (slow: weights load here)."""
    call_safely(pm, "lmserve_configure", config=config)
    model = resolve_model(pm, config, announce=lambda line: print(f"lmserve: {line}", file=sys.stderr))
    source, tokenizer, choice = model.source, model.tokenizer, model.template_choice
    parsers = [parser for contributed in pm.hook.lmserve_tool_parsers() for parser in contributed]
    tool_parser = choose_tool_parser(parsers, config.tool_call_parser, tool_format_sample(choice.template))
    reasoning_name = config.options.get("reasoning_parser")  # an unknown name stops here, before the weights
    reasoning_parser = choose_reasoning_parser(
        [parser for contributed in pm.hook.lmserve_reasoning_parsers() for parser in contributed],
        reasoning_name, getattr(choice.template, "source", None) or "")
    print(f"lmserve: {reasoning_choice_line(reasoning_parser, reasoning_name)}", file=sys.stderr)
    grammars = call_safely(pm, "lmserve_grammar_compiler", tokenizer=tokenizer)
    if grammars is None:
        logger.warning("No plugin offers a grammar engine (lmserve_grammar_compiler): requests with a "
                       "response_format or a forced tool call will be refused with a 400.")
    sampling_defaults = resolve_sampling_defaults(pm, config, source)  # a bad --generation-config fails here
    print(f"lmserve: {sampling_defaults.describe()}", file=sys.stderr)
    backend = make_backend(pm, config, source)
    # A stop word of one token stops generation like EOS does (and is not shown); a
    # longer one can only be found in the text, as a request's own stop strings are.
    stop_ids, stop_strings = [], []
    for word in choice.template.stop_words:
        ids = tokenizer.encode(word, add_bos=False)
        if len(ids) == 1:
            stop_ids.append(ids[0])
        elif ids:
            stop_strings.append(word)
    return ServerState(
        config=config,
        model_name=config.model_name or source.name,
        bus=RequestBus(backend, tokenizer, hooks=pm.hook, session_ttl_s=config.session_ttl),
        tokenizer=tokenizer,
        chat_template=choice.template,
        default_stop_token_ids=tuple(stop_ids),
        default_stop_strings=tuple(stop_strings),
        grammars=grammars,
        tool_parser=tool_parser,
        json_tool_parser=choose_tool_parser(parsers, "json", ""),
        reasoning_parser=reasoning_parser,
        reasoning_keeps_special_tokens=reasoning_parser is not None and reasoning_parser.keeps_special_tokens(tokenizer),
        sampling_defaults=sampling_defaults,
    )


def tool_format_sample(template) -> str:
    """What shows a template's tool format to :meth:`ToolParser.fits`: its source
    (a Jinja template), and a conversation with a tool call rendered through it."""
    sample_tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
    conversation = [{"role": "user", "content": "?"},
                    {"role": "assistant", "content": None,
                     "tool_calls": [{"id": "c", "type": "function", "function": {"name": "f", "arguments": "{}"}}]},
                    {"role": "tool", "tool_call_id": "c", "content": "!"}]
    try:
        rendered = render_chat(template, conversation, tools=[sample_tool])
    except Exception:  # a template that refuses tools shows no format
        rendered = ""
    return f"{getattr(template, 'source', '') or ''}\n{rendered}"


def create_app(state: ServerState, pm: pluggy.PluginManager, announce: bool = True) -> Sanic:
    """The Sanic app over ``state``; routes come from :hook:`lmserve_register_routes`.

    ``announce``: print the URLs it serves on once it listens (``lmserve chat``
    serves on a loopback port of its own choosing, and says nothing).

    Request middleware runs in this order: CORS preflight, API key, then the
    route; a generation route (declared with :func:`~lmserve.frontends.http.limits.admitted`)
    goes through the admission queue. Connections are held to the request and response
    timeouts (timeouts.py); a request cut by the response timeout or by shutdown ends
    with an error its client can read (cuts.py).
    """
    config = HTTPConfig.from_options(state.config.options)
    # lmserve configures logging itself (--log-level); Sanic would add its own handlers.
    app = TimedSanic("lmserve", configure_logging=False)
    app.config.FALLBACK_ERROR_FORMAT = "json"
    # Sanic answers 503 when a handler has sent nothing for RESPONSE_TIMEOUT (60 s): a
    # long non-streaming generation sends nothing until it is done.
    app.config.RESPONSE_TIMEOUT = NO_RESPONSE_TIMEOUT_S
    app.ctx.state = state
    _setup_errors(app)
    _setup_lifecycle(app, state, pm, announce)
    setup_cuts(app)
    setup_timeouts(app, config)
    setup_graceful_shutdown(app, config.shutdown_timeout)
    setup_cors(app, config)
    setup_auth(app, config.api_keys)
    setup_limits(app, config)  # the queue the routes declared @admitted go through
    call_safely(pm, "lmserve_register_routes", app=app, state=state)
    refuse_generation_flags(app)
    setup_openapi(app, disable_docs=config.disable_docs, swagger_ui_cdn=config.swagger_ui_cdn)
    return app


def _setup_errors(app: Sanic) -> None:
    @app.exception(APIError)
    async def api_error(request: Request, exc: APIError):
        return error_response(exc.status, exc.message, exc.param)

    @app.exception(InvalidRequestError)
    async def invalid_request(request: Request, exc: InvalidRequestError):
        # The request rules (core.validation) and whatever lies below the routes, e.g. a chat template.
        return error_response(400, exc.message, exc.param)

    @app.exception(SessionLostError)
    async def session_lost(request: Request, exc: SessionLostError):
        # An interactive session whose KV cache went with its replica (before a turn, or
        # during one before its first token).
        return error_response(410, str(exc), "session_id")

    @app.exception(BackendUnavailableError)
    async def unavailable(request: Request, exc: BackendUnavailableError):
        return error_response(503, str(exc), retry_after=5)

    @app.exception(PayloadTooLarge)
    async def too_large(request: Request, exc: PayloadTooLarge):
        message = str(exc) or "Payload too large."
        if "body" in message:
            message = f"The request body is larger than this server accepts ({app.config.REQUEST_MAX_SIZE} bytes)."
        return error_response(413, message)

    @app.exception(SanicException)
    async def sanic_error(request: Request, exc: SanicException):
        response = error_response(exc.status_code, str(exc) or "Error.")
        if isinstance(exc, MethodNotAllowed) and exc.allowed_methods:
            # RFC 9110: a 405 lists the methods the resource has.
            response.headers["Allow"] = ", ".join(sorted(exc.allowed_methods))
        return response

    @app.exception(Exception)
    async def unexpected(request: Request, exc: Exception):
        logger.exception("Unhandled error on %s %s", request.method, request.path)
        return error_response(500, f"Internal error: {type(exc).__name__}.")


def _setup_lifecycle(app: Sanic, state: ServerState, pm: pluggy.PluginManager, announce: bool) -> None:
    @app.before_server_start
    async def start_engine(app: Sanic):
        state.bus.start()

    @app.after_server_start
    async def announce_urls(app: Sanic):
        if not announce:
            return
        host = state.config.server_name
        shown = "127.0.0.1" if host in ("0.0.0.0", "::") else host
        url = f"http://{shown}:{state.config.server_port}"
        print(
            f"lmserve: serving {state.model_name!r} on {host}:{state.config.server_port}\n"
            f"  OpenAI base_url: {url}/v1\n"
            f"  health:          {url}/health",
            file=sys.stderr,
            flush=True,
        )

    # After the drain (shutdown.py): the engine serves in-flight requests until then.
    @app.after_server_stop
    async def stop_engine(app: Sanic):
        # Handlers still running when the drain timed out were cancelled: let them
        # unwind (abort their generations, notify observers) while the engine runs.
        others = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
        if others:
            await asyncio.wait(others, timeout=UNWIND_TIMEOUT_S)
        state.bus.shutdown()
        pm.hook.lmserve_shutdown()
