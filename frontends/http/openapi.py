"""The OpenAPI document (``GET /openapi.json``) and Swagger UI (``GET /``).

The document is OpenAPI 3.1, generated from the same pydantic models that
validate the requests (protocol.py) plus the models of the response bodies
(responses.py). Every route on the app appears: with the summary, body and
responses of its :class:`RouteDoc`, or as a bare operation when it has none. A
route declares its doc where it is registered, ``app.add_route(...,
ctx_doc=RouteDoc(...))`` (the interactive route does; a plugin's route may);
the OpenAI routes of this package have theirs in :data:`ROUTE_DOCS`, by route name.

Both are served here, not by sanic-ext: its generator writes OpenAPI 3.0.3 and
flattens pydantic models, which cannot say "string or null" the way pydantic's
JSON Schema does, nor describe the events of a stream; and its Swagger UI page
loads its scripts from a public CDN, blank on a machine without internet
access. The document is built when the server starts; the page's Swagger UI
files are the installed ones (``swagger-ui-py`` ships them), the CDN only with
``--swagger-ui-cdn``. None of sanic-ext's extensions is enabled (CORS,
automatic OPTIONS/HEAD routes, injection, health monitor), so the server
behaves the same with or without the docs.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import re
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel
from sanic import Sanic
from sanic.response import html
from sanic.response import json as json_response

from lmserve.frontends.http import responses
from lmserve.frontends.http.protocol import (
    TOKEN_ID_MARK,
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    EncodeRequest,
    TokenizeRequest,
)

OPENAPI_VERSION = "3.1.0"
#: The Swagger UI ``--swagger-ui-cdn`` loads (5 is the first to render OpenAPI 3.1); by
#: default the page uses the one swagger-ui-py installed.
SWAGGER_UI_VERSION = "5.17.14"
_REF = "#/components/schemas/{model}"


@dataclass(frozen=True)
class RouteDoc:
    """What the document says about one route (by route name)."""

    summary: str
    tag: str
    request: type[BaseModel] | None = None  # the JSON body
    response: type[BaseModel] | None = None  # the JSON body of a 200
    stream: type[BaseModel] | None = None  # one event of a ``stream: true`` 200
    line_stream: type[BaseModel] | None = None  # one line of a ``stream: true`` 200 in JSON lines
    text_response: bool = False  # the 200 is text/plain
    errors: tuple[int, ...] = ()
    description: str = ""
    #: Needs no API key (when the server has ``--api-keys``).
    public: bool = False
    #: Goes through the admission queue (limits.py): its 503 carries ``Retry-After``.
    admitted: bool = False
    #: An example of the JSON body (the OpenAI routes' examples are built here, with the model's name).
    example: dict | None = field(default=None, hash=False)


#: 409: a ``session_id`` of a live interactive session.
_GENERATION_ERRORS = (400, 404, 408, 409, 413, 500, 503, 504)

#: The docs of this package's routes, by route name; any other route declares its own (``ctx_doc``).
ROUTE_DOCS: dict[str, RouteDoc] = {
    "models": RouteDoc("List the served model", "OpenAI", response=responses.ModelList),
    "chat_completions": RouteDoc(
        "Create a chat completion", "OpenAI", ChatCompletionRequest, responses.ChatCompletion,
        responses.ChatCompletionChunk, errors=_GENERATION_ERRORS, admitted=True,
        description="With `stream: true` the answer is a stream of server-sent events, one "
        "`ChatCompletionChunk` each, ending with `data: [DONE]`.",
    ),
    "completions": RouteDoc(
        "Create a text completion", "OpenAI", CompletionRequest, responses.Completion,
        responses.CompletionChunk, errors=_GENERATION_ERRORS, admitted=True,
        description="With `stream: true` the answer is a stream of server-sent events, one "
        "`CompletionChunk` each, ending with `data: [DONE]`.",
    ),
    "encode": RouteDoc(
        "Token ids of texts (LMDeploy)", "Tokenizer", EncodeRequest, responses.EncodeResponse,
        errors=(400, 413), description="A string gives one list of ids; a list of strings, one list per string.",
    ),
    "tokenize": RouteDoc(
        "Token ids of a prompt or of chat messages", "Tokenizer", TokenizeRequest, responses.TokenizeResponse,
        errors=(400, 404, 413), description="Send exactly one of `prompt` and `messages`.",
    ),
    "detokenize": RouteDoc(
        "Text of token ids", "Tokenizer", DetokenizeRequest, responses.DetokenizeResponse, errors=(400, 404, 413),
    ),
    "health": RouteDoc(
        "Whether the engine runs", "Server", response=responses.HealthResponse, errors=(503,), public=True,
    ),
    "metrics": RouteDoc("Prometheus metrics", "Server", text_response=True, public=True),
}

_ERROR_DESCRIPTIONS = {
    400: "Invalid request; `param` names the field at fault.",
    401: "Missing or wrong API key.",
    404: "No such model, session (of this API key), or route.",
    408: "The client sent its headers or body too slowly (--request-timeout).",
    409: "The session has a turn running already.",
    413: "The body is too large.",
    429: "A per-client limit: live interactive sessions, or their tokens.",
    500: "The engine failed the request.",
    503: "The engine is not running, the server is full, or it is shutting down.",
    504: "The response took longer than --response-timeout.",
}


# ------------------------------------------------------------------- the document


def build_openapi(app: Sanic) -> dict:
    """The OpenAPI document of every route now registered on ``app``."""
    state = getattr(app.ctx, "state", None)
    options = state.config.options if state is not None else {}
    builder = _DocumentBuilder(
        model_name=getattr(state, "model_name", None) or "MODEL",
        example_ids=_example_ids(state),
        api_keys=bool(options.get("api_keys")),
    )
    for route in sorted(app.router.routes, key=lambda route: route.uri):
        builder.add_route(route)
    document = builder.document()
    vocab_size = getattr(getattr(state, "tokenizer", None), "vocab_size", None)
    limit_token_ids(document, vocab_size if isinstance(vocab_size, int) else None)
    return document


def decimal_range_pattern(largest: int) -> str:
    """A regular expression of the decimal numbers 0..``largest`` (no sign, no leading zeros needed)."""
    digits = str(largest)
    alternatives = [f"[0-9]{{1,{len(digits) - 1}}}"] if len(digits) > 1 else []
    for position, digit in enumerate(digits):
        rest = len(digits) - position - 1
        low = "1" if position == 0 and len(digits) > 1 else "0"
        if int(digit) > int(low):
            tail = f"[0-9]{{{rest}}}" if rest else ""
            alternatives.append(f"{digits[:position]}[{low}-{int(digit) - 1}]{tail}")
    alternatives.append(digits)
    return "|".join(alternatives)


def limit_token_ids(node: Any, vocab_size: int | None) -> None:
    """Token ids (marked ``x-lmserve-token-id`` by the models) get the vocabulary's last id as their
    maximum; token ids written as text (``logit_bias`` keys), a pattern of the numbers up to it."""
    if isinstance(node, dict):
        if node.pop(TOKEN_ID_MARK, False) and vocab_size is not None:
            if "pattern" in node:
                node["pattern"] = f"^0*(?:{decimal_range_pattern(vocab_size - 1)})$"
            else:
                node["maximum"] = vocab_size - 1
        for value in node.values():
            limit_token_ids(value, vocab_size)
    elif isinstance(node, list):
        for value in node:
            limit_token_ids(value, vocab_size)


class _DocumentBuilder:
    def __init__(self, model_name: str, example_ids: list[int], api_keys: bool):
        self.model_name = model_name
        self.example_ids = example_ids
        self.api_keys = api_keys
        self.paths: dict[str, dict[str, Any]] = {}
        self.schemas: dict[str, dict] = {}
        self.operation_ids: set[str] = set()

    def document(self) -> dict:
        try:
            version = importlib.metadata.version("lmserve")
        except importlib.metadata.PackageNotFoundError:
            version = "0.0.0"
        self.schema_ref(responses.ErrorResponse)  # always there, whether used or not
        document: dict[str, Any] = {
            "openapi": OPENAPI_VERSION,
            "info": {
                "title": "lmserve",
                "version": version,
                "description": f"An OpenAI-compatible API serving `{self.model_name}`. Errors have the shape "
                "`{\"error\": {\"message\", \"type\", \"param\", \"code\"}}` (`ErrorResponse`).",
            },
            "paths": self.paths,
            "components": {"schemas": dict(sorted(self.schemas.items()))},
        }
        if self.api_keys:
            document["components"]["securitySchemes"] = {"apiKey": {"type": "http", "scheme": "bearer"}}
        return document

    # ------------------------------------------------------------------ routes

    def add_route(self, route) -> None:
        name = route.name.split(".", 1)[-1]  # Sanic prefixes the app's name
        if name in DOCS_ROUTES or route.extra.static or route.extra.websocket:
            return  # the docs themselves, files, websockets
        path, parameters = _openapi_path(route.uri)
        doc = getattr(route.ctx, "doc", None) or ROUTE_DOCS.get(name)
        methods = sorted(method for method in route.methods if method not in ("HEAD", "OPTIONS"))
        for method in methods:
            operation_id = name if len(methods) == 1 else f"{name}_{method.lower()}"
            while operation_id in self.operation_ids:
                operation_id += "_"
            self.operation_ids.add(operation_id)
            operation = self.operation(doc, name, operation_id)
            if parameters:
                operation["parameters"] = parameters
            self.paths.setdefault(path, {})[method.lower()] = operation

    def operation(self, doc: RouteDoc | None, name: str, operation_id: str) -> dict:
        if doc is None:  # a plugin's route: all we know is that it exists
            return {
                "operationId": operation_id,
                "summary": name.replace("_", " ").replace(".", " ").capitalize(),
                "tags": ["Plugins"],
                "responses": {"default": {"description": "Described by the plugin that registered this route."}},
            }
        operation: dict[str, Any] = {"operationId": operation_id, "summary": doc.summary, "tags": [doc.tag]}
        if doc.description:
            operation["description"] = doc.description
        if doc.request is not None:
            media: dict[str, Any] = {"schema": self.schema_ref(doc.request, mode="validation")}
            example = doc.example if doc.example is not None else self.request_example(name)
            if example is not None:
                media["example"] = example
            operation["requestBody"] = {"required": True, "content": {"application/json": media}}
        operation["responses"] = self.operation_responses(doc)
        if self.api_keys and not doc.public:
            operation["security"] = [{"apiKey": []}]
        return operation

    def operation_responses(self, doc: RouteDoc) -> dict:
        content: dict[str, Any] = {}
        if doc.response is not None:
            content["application/json"] = {"schema": self.schema_ref(doc.response)}
        if doc.stream is not None:
            content["text/event-stream"] = {"schema": self.event_schema(doc.stream)}
        if doc.line_stream is not None:
            content["application/x-ndjson"] = {"schema": self.schema_ref(doc.line_stream)}
        if doc.text_response:
            content["text/plain"] = {"schema": {"type": "string"}}
        result: dict[str, Any] = {"200": {"description": "OK", **({"content": content} if content else {})}}
        errors = set(doc.errors) | ({401} if self.api_keys and not doc.public else set())
        error_schema = self.schema_ref(responses.ErrorResponse)
        for status in sorted(errors):
            result[str(status)] = {
                "description": _ERROR_DESCRIPTIONS.get(status, "Error."),
                "content": {"application/json": {"schema": error_schema}},
            }
            if status == 503 and doc.admitted:
                result["503"]["headers"] = {"Retry-After": {
                    "description": "Seconds to wait before retrying (the server is full).",
                    "schema": {"type": "integer"},
                }}
        return result

    def event_schema(self, chunk: type[BaseModel]) -> dict:
        """One server-sent event: a chunk, an error (after streaming began), or ``[DONE]``."""
        return {
            "type": "object",
            "required": ["data"],
            "properties": {
                "data": {
                    "anyOf": [
                        {
                            "type": "string",
                            "contentMediaType": "application/json",
                            "contentSchema": {
                                "anyOf": [self.schema_ref(chunk), self.schema_ref(responses.ErrorResponse)],
                            },
                        },
                        {"const": "[DONE]"},
                    ]
                }
            },
        }

    def request_example(self, name: str) -> dict | None:
        model = self.model_name
        return {
            "chat_completions": {"model": model, "messages": [{"role": "user", "content": "Hello!"}], "max_tokens": 16},
            "completions": {"model": model, "prompt": "Once upon a time", "max_tokens": 16},
            "encode": {"input": "Hello, world"},
            "tokenize": {"model": model, "prompt": "Hello, world"},
            "detokenize": {"model": model, "tokens": self.example_ids},
        }.get(name)

    # ----------------------------------------------------------------- schemas

    def schema_ref(self, model: type[BaseModel], mode: str = "serialization") -> dict:
        """``{"$ref": ...}`` to ``model``, adding it and the models it uses to the components."""
        schema = model.model_json_schema(mode=mode, ref_template=_REF)
        for name, definition in schema.pop("$defs", {}).items():
            self._add_schema(name, definition)
        self._add_schema(model.__name__, schema)
        return {"$ref": _REF.format(model=model.__name__)}

    def _add_schema(self, name: str, schema: dict) -> None:
        known = self.schemas.setdefault(name, schema)
        if known != schema:
            raise ValueError(f"Two different models are named {name!r}; the OpenAPI document needs unique names.")


def _openapi_path(uri: str) -> tuple[str, list[dict]]:
    """Sanic's ``/a/<name:int>`` as OpenAPI's ``/a/{name}`` and its path parameters."""
    parameters = []

    def replace(match: re.Match) -> str:
        name, _, kind = match.group(1).partition(":")
        schema = {"int": {"type": "integer"}, "float": {"type": "number"}}.get(kind, {"type": "string"})
        parameters.append({"name": name, "in": "path", "required": True, "schema": schema})
        return "{" + name + "}"

    path = re.sub(r"<([^>]+)>", replace, uri if uri.startswith("/") else "/" + uri)
    return path, parameters


def _example_ids(state) -> list[int]:
    try:
        return list(state.tokenizer.encode("Hello, world", add_bos=False))
    except (AttributeError, TypeError):  # no state (a bare app), or a tokenizer without add_bos
        return [1, 2, 3]


# ------------------------------------------------------------- serving the docs

#: Where ``--swagger-ui-cdn`` loads Swagger UI from instead of the installed files.
SWAGGER_UI_CDN = f"https://cdn.jsdelivr.net/npm/swagger-ui-dist@{SWAGGER_UI_VERSION}"
#: Where the installed Swagger UI files are served.
SWAGGER_UI_ASSETS = "/docs/swagger-ui"
#: The names of the docs' own routes (left out of the document).
DOCS_ROUTES = ("openapi.document", "openapi.swagger_ui", "openapi.assets")

_SWAGGER_PAGE = """<!doctype html>
<html lang="en">
<head>
  <meta charset="utf-8">
  <title>lmserve API</title>
  <link rel="stylesheet" href="{assets}/swagger-ui.css">
  <link rel="icon" type="image/png" href="{assets}/favicon-32x32.png">
</head>
<body>
  <div id="swagger-ui"></div>
  <script src="{assets}/swagger-ui-bundle.js"></script>
  <script>
    window.ui = SwaggerUIBundle({{
      url: "/openapi.json", dom_id: "#swagger-ui", deepLinking: true,
      docExpansion: "list", tryItOutEnabled: true,
    }});
  </script>
</body>
</html>
"""


def swagger_ui_files() -> str | None:
    """The folder of the installed Swagger UI files (the swagger-ui-py package ships them), or None."""
    spec = importlib.util.find_spec("swagger_ui")  # found, not imported: its own web integrations stay out
    for folder in (spec.submodule_search_locations or []) if spec is not None else []:
        static = os.path.join(folder, "static")
        if os.path.isfile(os.path.join(static, "swagger-ui-bundle.js")):
            return static
    return None


def setup_openapi(app: Sanic, disable_docs: bool = False, swagger_ui_cdn: bool = False) -> None:
    """Describe the registered routes in ``/openapi.json`` and serve Swagger UI at ``/``.

    Called by :func:`~lmserve.frontends.http.app.create_app` after the routes
    are registered; the document itself is built when the server starts, so
    routes added later appear too. ``disable_docs``: neither route exists.
    Swagger UI's scripts and styles are the installed ones, served by the server
    itself (a machine without internet access shows the page too);
    ``swagger_ui_cdn``: the page loads them from a public CDN instead.
    """
    # Sanic would set sanic-ext up with every default on (CORS, /docs, OPTIONS routes, ...).
    app.extend(built_in_extensions=False)
    if disable_docs:
        return
    assets = SWAGGER_UI_CDN if swagger_ui_cdn else SWAGGER_UI_ASSETS
    if not swagger_ui_cdn:
        files = swagger_ui_files()
        if files is None:
            raise RuntimeError("Swagger UI's files are missing (the swagger-ui-py package ships them): "
                               "reinstall lmserve, or serve with --swagger-ui-cdn or --disable-docs.")
        app.static(SWAGGER_UI_ASSETS, files, name="openapi.assets")
    page = _SWAGGER_PAGE.format(assets=assets)
    document: dict = {}

    async def openapi_document(request):
        return json_response(document)

    async def swagger_ui(request):
        return html(page)

    app.add_route(openapi_document, "/openapi.json", methods=["GET"], name="openapi.document")
    app.add_route(swagger_ui, "/", methods=["GET"], name="openapi.swagger_ui")

    @app.before_server_start
    async def build_openapi_document(app: Sanic) -> None:
        document.update(build_openapi(app))
