"""Build the server: resolve the model through the hooks, then the Sanic app."""

from __future__ import annotations

import logging
import sys

import pluggy
from sanic import Request, Sanic
from sanic.exceptions import SanicException

from lmserve.core.bus import RequestBus
from lmserve.core.config import ServeConfig
from lmserve.core.model_source import ModelNotFoundError
from lmserve.core.plugins import PluginError, call_safely
from lmserve.frontends.openai.errors import APIError, error_response
from lmserve.frontends.openai.openapi import setup_openapi
from lmserve.frontends.openai.state import ServerState

logger = logging.getLogger(__name__)


def build_state(config: ServeConfig, pm: pluggy.PluginManager) -> ServerState:
    """Everything the routes need, built through the hooks (slow: weights load here)."""
    call_safely(pm, "lmserve_configure", config=config)
    tried: list[str] = []
    source = call_safely(pm, "lmserve_resolve_model", model=config.model, tried=tried)
    if source is None:
        raise ModelNotFoundError(config.model, tried)
    print(f"lmserve: model {config.model!r} found by {source.found_by}: {source.path}", file=sys.stderr)
    tokenizer = call_safely(pm, "lmserve_load_tokenizer", source=source)
    if tokenizer is None:
        raise PluginError(f"No plugin could load the tokenizer of {source.path}.")
    chat_template = call_safely(pm, "lmserve_chat_template", source=source, tokenizer=tokenizer, config=config)
    backend = call_safely(pm, "lmserve_make_backend", config=config, source=source)
    if backend is None:
        raise PluginError("No backend plugin is loaded.")
    stop_ids = []
    for word in getattr(chat_template, "stop_words", ()):
        ids = tokenizer.encode(word, add_bos=False)
        if len(ids) == 1:
            stop_ids.append(ids[0])
    return ServerState(
        config=config,
        model_name=config.model_name or source.name,
        bus=RequestBus(backend, tokenizer, hooks=pm.hook),
        tokenizer=tokenizer,
        chat_template=chat_template,
        default_stop_token_ids=tuple(stop_ids),
    )


def create_app(state: ServerState, pm: pluggy.PluginManager) -> Sanic:
    """The Sanic app over ``state``; routes come from :hook:`lmserve_register_routes`."""
    # lmserve configures logging itself (--log-level); Sanic would add its own handlers.
    app = Sanic("lmserve", configure_logging=False)
    app.config.FALLBACK_ERROR_FORMAT = "json"
    app.ctx.state = state
    _setup_errors(app)
    _setup_lifecycle(app, state, pm)
    call_safely(pm, "lmserve_register_routes", app=app, state=state)
    setup_openapi(app, disable_docs=bool(state.config.options.get("disable_docs", False)))
    return app


def _setup_errors(app: Sanic) -> None:
    @app.exception(APIError)
    async def api_error(request: Request, exc: APIError):
        return error_response(exc.status, exc.message, exc.param)

    @app.exception(SanicException)
    async def sanic_error(request: Request, exc: SanicException):
        return error_response(exc.status_code, str(exc) or "Error.")

    @app.exception(Exception)
    async def unexpected(request: Request, exc: Exception):
        logger.exception("Unhandled error on %s %s", request.method, request.path)
        return error_response(500, f"Internal error: {type(exc).__name__}.")


def _setup_lifecycle(app: Sanic, state: ServerState, pm: pluggy.PluginManager) -> None:
    @app.before_server_start
    async def start_engine(app: Sanic):
        state.bus.start()

    @app.after_server_start
    async def announce(app: Sanic):
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

    @app.before_server_stop
    async def stop_engine(app: Sanic):
        state.bus.shutdown()
        pm.hook.lmserve_shutdown()
