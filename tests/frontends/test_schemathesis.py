"""Schemathesis against a live server: no 5xx, and every response as ``/openapi.json`` says.

For each operation: fixed scenarios that must succeed (streams, logprobs,
several choices, ...), then schema-valid and schema-invalid requests generated
by schemathesis. Every response is checked against the document: status code
documented, content type documented, body (each event of a stream too) valid
against its schema, and never a 5xx.

Bounded: derandomized, a fixed number of requests per operation, a small
context (``--session-len 64``) so generations stay short, no shrinking.
``LMSERVE_FUZZ_EXAMPLES=500`` makes a longer, randomized hunt.

(schemathesis' pytest loader ``schemathesis.pytest.from_fixture`` does not run
under pytest 9, so the cases are drawn with hypothesis here.)
"""

from __future__ import annotations

import collections
import os

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from schemathesis.checks import not_a_server_error
from schemathesis.config import SchemathesisConfig
from schemathesis.generation import GenerationMode
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from conftest import LiveServer

MODEL = "tiny"
#: Generated requests per operation, valid and invalid together.
EXAMPLES_PER_OPERATION = int(os.environ.get("LMSERVE_FUZZ_EXAMPLES", "60"))
#: At most this many choices per request: ``n`` sets the cost of a request, not its validity.
MAX_CHOICES = 3
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]

_CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
_COMPLETION = {"model": MODEL, "prompt": "abc", "max_tokens": 4}
#: Requests every server must answer with a 200, by operationId (= route name). An
#: operation missing from the document is skipped (a plugin's route, e.g. metrics).
SCENARIOS: dict[str, list[dict | None]] = {
    "models": [None],
    "health": [None],
    "metrics": [None],
    "chat_completions": [
        _CHAT,
        {**_CHAT, "n": 2, "logprobs": True, "top_logprobs": 2},
        {**_CHAT, "stream": True},
        {**_CHAT, "stream": True, "stream_options": {"include_usage": True}, "n": 2, "logprobs": True,
         "top_logprobs": 1},
        {**_CHAT, "messages": "raw prompt", "stop": ["a", "b"], "seed": 1},
    ],
    "completions": [
        _COMPLETION,
        {**_COMPLETION, "prompt": ["abc", "de"], "n": 2, "logprobs": 2},
        {**_COMPLETION, "prompt": [[5, 6, 7], [8, 9]]},
        {**_COMPLETION, "echo": True},
        {**_COMPLETION, "echo": True, "logprobs": 2},
        {**_COMPLETION, "stream": True, "echo": True, "logprobs": 1},
        {**_COMPLETION, "stream": True, "echo": True, "stream_options": {"include_usage": True}},
        {**_COMPLETION, "stream": True, "logprobs": 1, "n": 2},
    ],
    "encode": [{"input": "abc"}, {"input": ["abc", "de"], "do_preprocess": True}],
    "tokenize": [{"model": MODEL, "prompt": "abc"}, {"messages": [{"role": "user", "content": "abc"}]}],
    "detokenize": [{"model": MODEL, "tokens": [5, 6, 7]}],
    "chat_interactive": [
        {"prompt": "hi", "session_id": 7, "interactive_mode": True, "request_output_len": 4},
        {"prompt": "more", "session_id": 7, "interactive_mode": True, "stream": True, "request_output_len": 4},
        {"prompt": [{"role": "user", "content": "hi"}], "session_id": -1, "request_output_len": 4},
        {"prompt": "", "session_id": 7, "cancel": True},
        {"prompt": "", "session_id": 7, "request_output_len": 0, "interactive_mode": False},
    ],
    "create_session": [None],
}

#: Half the schema-valid chat / completions requests are made realistic: the generated
#: model and prompt, plus some of these features. (Generated sampling fields are mostly
#: out of range, a 400, so such requests would seldom stream or return logprobs.)
_FEATURES = {
    "chat_completions": {
        "stream": st.booleans(), "stream_options": st.just({"include_usage": True}), "logprobs": st.just(True),
        "top_logprobs": st.integers(0, 3), "n": st.integers(1, MAX_CHOICES), "max_tokens": st.integers(1, 8),
    },
    "completions": {
        "stream": st.booleans(), "logprobs": st.integers(0, 3), "echo": st.booleans(),
        "n": st.integers(1, MAX_CHOICES), "max_tokens": st.integers(1, 8),
    },
    "chat_interactive": {
        "stream": st.booleans(), "session_id": st.integers(-1, 3), "interactive_mode": st.booleans(),
        "request_output_len": st.integers(0, 8),
    },
}

HYPOTHESIS_SETTINGS = settings(
    max_examples=EXAMPLES_PER_OPERATION,
    derandomize="LMSERVE_FUZZ_EXAMPLES" not in os.environ,
    database=None,
    deadline=None,
    phases=[Phase.explicit, Phase.generate],  # no shrinking: a failure is reported as found
    suppress_health_check=list(HealthCheck),
)


@pytest.fixture(scope="module")
def fuzzed_server(tiny_model_dir):
    server = LiveServer(tiny_model_dir, "--model-name", MODEL, "--session-len", "64")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def api_schema(fuzzed_server):
    config = SchemathesisConfig.from_dict({"request-timeout": 60, "max-stream-events": 200})
    schema = schemathesis.openapi.from_url(fuzzed_server.base_url + "/openapi.json", config=config)
    schema.config.update(base_url=fuzzed_server.base_url)
    return schema


def _operation(api_schema, operation_id: str):
    for result in api_schema.get_all_operations():
        operation = result.ok()
        if operation.definition.raw.get("operationId") == operation_id:
            return operation
    pytest.skip(f"the server has no {operation_id!r} route")


def _steer(operation_id: str, positive: bool):
    """Mostly the served model (any other name is a 404), a few choices at most, and
    (valid bodies) sometimes a realistic request."""

    def steer(case):
        body = case.body
        if not isinstance(body, dict):
            return st.just(case)
        drawn = {}
        if isinstance(body.get("model"), str):
            drawn["model"] = st.sampled_from([MODEL, MODEL, MODEL, body["model"]])
        if isinstance(body.get("n"), int) and MAX_CHOICES < body["n"] <= 128:
            drawn["n"] = st.integers(1, MAX_CHOICES)
        bodies = st.fixed_dictionaries(drawn).map(lambda values: {**body, **values})
        if positive and operation_id in _FEATURES:
            essentials = [key for key in ("model", "messages", "prompt") if key in body]
            features = st.fixed_dictionaries({}, optional=_FEATURES[operation_id])
            realistic = st.tuples(bodies, features).map(
                lambda pair: {**{key: pair[0][key] for key in essentials}, **pair[1]})
            bodies = st.one_of(bodies, realistic)

        def apply(new_body: dict):
            if new_body.get("stream") is not True:
                new_body.pop("stream_options", None)
            case.body = new_body
            return case

        return bodies.map(apply)

    return steer


@pytest.mark.timeout(300)
@pytest.mark.parametrize("operation_id", list(SCENARIOS))
def test_responses_match_the_openapi_document(api_schema, operation_id):
    operation = _operation(api_schema, operation_id)
    for body in SCENARIOS[operation_id]:
        case = operation.Case() if body is None else operation.Case(body=body, media_type="application/json")
        response = case.call_and_validate(checks=CHECKS)
        assert response.status_code == 200, (body, response.text)

    statuses = collections.Counter()

    def check(case):
        statuses[case.call_and_validate(checks=CHECKS).status_code] += 1

    for example in operation.get_strategies_from_examples():  # the document's own examples
        settings(HYPOTHESIS_SETTINGS, max_examples=1)(given(example)(check))()
    generated = st.one_of(
        operation.as_strategy(GenerationMode.POSITIVE).flatmap(_steer(operation_id, positive=True)),
        operation.as_strategy(GenerationMode.NEGATIVE).flatmap(_steer(operation_id, positive=False)),
    )
    HYPOTHESIS_SETTINGS(given(generated)(check))()
    assert sum(statuses.values()) > 0


def test_every_built_in_operation_is_tested(fuzzed_server):
    """A new built-in route must join SCENARIOS (a plugin's route is tagged Plugins)."""
    document = httpx.get(fuzzed_server.base_url + "/openapi.json").json()
    operations = [op for item in document["paths"].values() for op in item.values()]
    ids = {op["operationId"] for op in operations if op["tags"] != ["Plugins"]}
    assert ids <= set(SCENARIOS)


#: Values the document allows that once failed the server (found by this test): each
#: must be a 4xx or a 200. top_k beyond int32 overflowed the sampler's column and failed
#: the engine step for every request in the batch; '²'.isdigit() is true, int('²') raises.
_NEVER_5XX = [
    pytest.param({"top_k": 2**31}, id="top_k-beyond-int32"),
    pytest.param({"logit_bias": {"\u00b2": 1}}, id="logit_bias-superscript-digit"),
    pytest.param({"seed": 2**70, "n": 2}, id="huge-seed"),
    pytest.param({"max_tokens": 2**63}, id="huge-max_tokens"),
    pytest.param({"min_tokens": 2**63}, id="huge-min_tokens"),
    pytest.param({"stop_token_ids": [2**64]}, id="huge-stop-token"),
    pytest.param({"logit_bias": {"00005": 100, "\u0663": 1}}, id="logit_bias-digit-spellings"),
]


@pytest.mark.parametrize("fields", _NEVER_5XX)
def test_values_the_document_allows_are_never_a_server_error(api_schema, fields):
    operation = _operation(api_schema, "completions")
    operation.Case(body={**_COMPLETION, **fields}, media_type="application/json").call_and_validate(checks=CHECKS)
