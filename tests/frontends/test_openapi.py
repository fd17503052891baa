"""``/openapi.json`` and Swagger UI at ``/``: a valid document built from the pydantic models."""

from __future__ import annotations

import itertools
from types import SimpleNamespace

import httpx
import pytest
from openapi_spec_validator import validate
from sanic import Sanic

from lmserve.frontends.http import protocol, responses
from lmserve.frontends.http.openapi import RouteDoc, build_openapi, decimal_range_pattern, limit_token_ids

#: (method, path, operationId, request model, 200 JSON model) of every built-in route.
#: The tiny test model's vocabulary (tests/tiny_tokenizer.py).
TINY_VOCAB_SIZE = 323

BUILT_IN = [
    ("get", "/v1/models", "models", None, responses.ModelList),
    ("get", "/health", "health", None, responses.HealthResponse),
    ("post", "/v1/chat/completions", "chat_completions", protocol.ChatCompletionRequest, responses.ChatCompletion),
    ("post", "/v1/completions", "completions", protocol.CompletionRequest, responses.Completion),
    ("post", "/v1/encode", "encode", protocol.EncodeRequest, responses.EncodeResponse),
    ("post", "/tokenize", "tokenize", protocol.TokenizeRequest, responses.TokenizeResponse),
    ("post", "/detokenize", "detokenize", protocol.DetokenizeRequest, responses.DetokenizeResponse),
]
_REF = "#/components/schemas/"


@pytest.fixture(scope="module")
def document(tiny_server):
    response = httpx.get(tiny_server.base_url + "/openapi.json")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/json")
    return response.json()


def _component(document, ref: dict) -> dict:
    assert ref["$ref"].startswith(_REF)
    return document["components"]["schemas"][ref["$ref"][len(_REF):]]


def test_the_document_is_valid_openapi_3_1(document):
    validate(document)
    assert document["openapi"].startswith("3.1")
    assert "tiny" in document["info"]["description"]


@pytest.mark.parametrize("method, path, operation_id, request_model, response_model", BUILT_IN)
def test_built_in_routes_have_their_pydantic_schemas(document, method, path, operation_id, request_model,
                                                     response_model):
    operation = document["paths"][path][method]
    assert operation["operationId"] == operation_id and operation["summary"]
    if request_model is None:
        assert "requestBody" not in operation
    else:
        media = operation["requestBody"]["content"]["application/json"]
        schema = request_model.model_json_schema(mode="validation", ref_template=_REF + "{model}")
        schema.pop("$defs", None)
        limit_token_ids(schema, TINY_VOCAB_SIZE)
        assert _component(document, media["schema"]) == schema
        request_model.model_validate(media["example"])  # the example is a valid request
        if "model" in media["example"]:
            assert media["example"]["model"] == "tiny"
    ok = operation["responses"]["200"]["content"]["application/json"]["schema"]
    assert ok == {"$ref": _REF + response_model.__name__}


def test_streams_document_their_chunks(document):
    for path, chunk in [("/v1/chat/completions", "ChatCompletionChunk"), ("/v1/completions", "CompletionChunk")]:
        event = document["paths"][path]["post"]["responses"]["200"]["content"]["text/event-stream"]["schema"]
        data = event["properties"]["data"]["anyOf"]
        assert {"const": "[DONE]"} in data
        refs = [ref["$ref"] for branch in data for ref in branch.get("contentSchema", {}).get("anyOf", [])]
        assert refs == [_REF + chunk, _REF + "ErrorResponse"]


def test_errors_share_one_schema_that_matches_real_errors(document, tiny_server):
    error_refs = [
        response["content"]["application/json"]["schema"]
        for item in document["paths"].values()
        for operation in item.values()
        for status, response in operation["responses"].items()
        if status[0] in "45"
    ]
    assert error_refs and all(ref == {"$ref": _REF + "ErrorResponse"} for ref in error_refs)
    statuses = {status for item in document["paths"].values() for op in item.values() for status in op["responses"]}
    assert {"400", "404", "413", "503"} <= statuses
    responses.ErrorResponse.model_validate(httpx.get(tiny_server.base_url + "/v1/nothing").json())
    bad = httpx.post(tiny_server.base_url + "/v1/completions", json={"model": "tiny", "prompt": "x", "n": 0})
    responses.ErrorResponse.model_validate(bad.json())


def test_swagger_ui_is_served_at_the_root(tiny_server):
    response = httpx.get(tiny_server.base_url + "/")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/html")
    assert "swagger-ui" in response.text and '"/openapi.json"' in response.text
    paths = httpx.get(tiny_server.base_url + "/openapi.json").json()["paths"]
    assert not {"/", "/docs", "/openapi.json", "/swagger-config"} & set(paths)  # the docs don't document themselves


def test_sanic_ext_adds_no_behaviour(tiny_server):
    """No automatic OPTIONS routes, no CORS headers unless --allow-origins: the docs change nothing else."""
    options = httpx.options(tiny_server.base_url + "/v1/models")
    assert options.status_code == 405 and options.json()["error"]["code"] == 405
    response = httpx.get(tiny_server.base_url + "/v1/models", headers={"Origin": "https://example.com"})
    assert not any(name.lower().startswith("access-control-") for name in response.headers)


def test_disable_docs_serves_neither(tiny_model_dir):
    from conftest import LiveServer

    server = LiveServer(tiny_model_dir, "--model-name", "tiny", "--session-len", "64", "--disable-docs")
    try:
        for path in ("/openapi.json", "/", "/docs"):
            response = httpx.get(server.base_url + path)
            assert response.status_code == 404, path
            responses.ErrorResponse.model_validate(response.json())
        assert httpx.get(server.base_url + "/health").status_code == 200
    finally:
        server.stop()


# ------------------------------------------------------ the builder, in process

_app_names = (f"openapi_test_{i}" for i in itertools.count())


def _app(options: dict | None = None) -> Sanic:
    app = Sanic(next(_app_names))
    tokenizer = SimpleNamespace(encode=lambda text, add_bos=True: [1, 2])
    app.ctx.state = SimpleNamespace(model_name="m", tokenizer=tokenizer, config=SimpleNamespace(options=options or {}))

    async def handler(request):
        pass

    app.add_route(handler, "/v1/models", methods=["GET"], name="models")
    app.add_route(handler, "/v1/chat/completions", methods=["POST"], name="chat_completions")
    return app


def test_a_plugins_routes_appear_with_their_path_parameters():
    app = _app()

    async def handler(request, session_id):
        pass

    app.add_route(handler, "/v1/sessions/<session_id:int>", methods=["GET", "DELETE"], name="session")
    document = build_openapi(app)
    validate(document)
    item = document["paths"]["/v1/sessions/{session_id}"]
    assert set(item) == {"get", "delete"}
    assert {op["operationId"] for op in item.values()} == {"session_get", "session_delete"}
    assert item["get"]["tags"] == ["Plugins"]
    assert item["get"]["parameters"] == [
        {"name": "session_id", "in": "path", "required": True, "schema": {"type": "integer"}}]


def test_api_keys_are_documented_when_required():
    document = build_openapi(_app({"api_keys": ["secret"]}))
    validate(document)
    assert document["components"]["securitySchemes"] == {"apiKey": {"type": "http", "scheme": "bearer"}}
    chat = document["paths"]["/v1/chat/completions"]["post"]
    assert chat["security"] == [{"apiKey": []}] and "401" in chat["responses"]
    assert "401" not in build_openapi(_app())["paths"]["/v1/chat/completions"]["post"]["responses"]


def test_a_route_declares_its_doc_where_it_is_registered():
    app = _app()

    async def handler(request):
        pass

    doc = RouteDoc("Tokens of a text", "Plugins", protocol.TokenizeRequest, responses.TokenizeResponse,
                   errors=(400, 503), admitted=True, example={"prompt": "hi"})
    app.add_route(handler, "/my/tokens", methods=["POST"], name="my_tokens", ctx_doc=doc)
    document = build_openapi(app)
    validate(document)
    operation = document["paths"]["/my/tokens"]["post"]
    assert operation["summary"] == "Tokens of a text" and operation["tags"] == ["Plugins"]
    assert operation["requestBody"]["content"]["application/json"]["example"] == {"prompt": "hi"}
    assert operation["responses"]["503"]["headers"]["Retry-After"]["schema"] == {"type": "integer"}


def test_structured_outputs_and_tools_are_documented(document):
    """The fields clients generate code from: response_format's three types, tools,
    tool_choice, and the answers' tool calls."""
    schemas = document["components"]["schemas"]
    chat = schemas["ChatCompletionRequest"]["properties"]
    for field in ("response_format", "tools", "tool_choice", "parallel_tool_calls"):
        assert field in chat, field
    text = str(schemas)
    for name in ("json_object", "json_schema", "regex_schema"):
        assert name in text, name
    assert "ToolCall" in schemas and "FunctionCall" in schemas
    message = schemas["AssistantMessage"]["properties"]
    assert "tool_calls" in message
    assert "tool_calls" in schemas["ChatCompletionDelta"]["properties"] and "ToolCallDelta" in schemas


# ------------------------------------------------ Swagger UI in a browser, offline


def test_swagger_ui_renders_offline_in_a_browser(tiny_server):
    """Chromium resolves no host but the loopback's: the page's files come from the server itself."""
    from headless_browser import artifacts_dir, start_chromium
    from selenium.common.exceptions import WebDriverException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser = start_chromium(offline=True)
    try:
        with pytest.raises(WebDriverException, match="ERR_NAME_NOT_RESOLVED"):  # the block holds
            browser.get("https://cdn.jsdelivr.net/")
        browser.get(tiny_server.base_url + "/")
        operations = WebDriverWait(browser, 60).until(
            lambda b: b.find_elements(By.CSS_SELECTOR, ".opblock-summary-path") or None)
        paths = {element.get_attribute("data-path") or element.text for element in operations}
        document = httpx.get(tiny_server.base_url + "/openapi.json").json()
        assert set(document["paths"]) <= {path.replace("\u200b", "") for path in paths}
        assert "lmserve" in browser.find_element(By.CSS_SELECTOR, ".info .title").text
        browser.save_screenshot(str(artifacts_dir() / "swagger-ui-offline.png"))
    finally:
        browser.quit()


def test_the_swagger_ui_cdn_is_an_option(tiny_model_dir):
    from conftest import LiveServer

    server = LiveServer(tiny_model_dir, "--model-name", "tiny", "--session-len", "64", "--swagger-ui-cdn")
    try:
        page = httpx.get(server.base_url + "/").text
        assert "https://cdn.jsdelivr.net/npm/swagger-ui-dist@" in page and "/docs/swagger-ui/" not in page
        assert httpx.get(server.base_url + "/docs/swagger-ui/swagger-ui-bundle.js").status_code == 404
    finally:
        server.stop()


@pytest.mark.parametrize("method, path, allowed", [
    ("TRACE", "/v1/models", "GET"), ("DELETE", "/v1/chat/completions", "POST"), ("PUT", "/", "GET"),
    ("PATCH", "/v1/chat/interactive", "POST"), ("GET", "/tokenize", "POST"),
])
def test_405_lists_the_allowed_methods(tiny_server, method, path, allowed):
    response = httpx.request(method, tiny_server.base_url + path)
    assert response.status_code == 405
    assert response.headers["Allow"] == allowed  # RFC 9110
    responses.ErrorResponse.model_validate(response.json())


def test_token_ids_are_limited_to_the_vocabulary(document, tiny_server):
    """The document's largest token id is the server's: one more is refused, it is not."""
    schemas = document["components"]["schemas"]
    largest = schemas["DetokenizeRequest"]["properties"]["tokens"]["items"]["maximum"]
    assert largest == TINY_VOCAB_SIZE - 1
    assert httpx.post(tiny_server.base_url + "/detokenize", json={"tokens": [largest]}).status_code == 200
    assert httpx.post(tiny_server.base_url + "/detokenize", json={"tokens": [largest + 1]}).status_code == 400
    keys = schemas["CompletionRequest"]["properties"]["logit_bias"]["propertyNames"]["pattern"]
    assert keys == f"^0*(?:{decimal_range_pattern(largest)})$"


@pytest.mark.parametrize("largest", [0, 1, 9, 10, 99, 100, 322, 1000, 49151])
def test_the_decimal_range_pattern_matches_exactly_the_numbers_up_to_its_limit(largest):
    import re

    pattern = re.compile(f"^0*(?:{decimal_range_pattern(largest)})$")
    assert all((pattern.match(str(number)) is not None) == (number <= largest) for number in range(3 * largest + 20))
    assert pattern.match(f"00{largest}") and pattern.match("0") and not pattern.match("-1") and not pattern.match("+1")
