"""A Python client generated from ``/openapi.json`` by openapi-python-client, against the tiny server.

The document the server serves is validated, turned into a client package with
``--fail-on-warning`` (the generator warns about every part of a document it
cannot turn into code, and then leaves that part out), installed with pip into
the test's temp folder, and imported from there. Its typed calls then parse the
server's real answers into the generated models: the model list, a chat
completion, two turns of an interactive session, the end of that session and an
error. docs/clients.md shows the same commands.
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from openapi_spec_validator import validate

MODEL = "tiny"
#: The generator's command line, installed next to this interpreter (with ruff, which formats its output).
GENERATOR = Path(sys.executable).with_name("openapi-python-client")
PACKAGE = "lmserve_client"  # the generator's name for the package of a document titled "lmserve"
SESSION_ID = 7
OUTPUT_LEN = 4


def _run(command: list, cwd: Path) -> str:
    """Run ``command`` (this interpreter's folder first on PATH); its output, checked to exit 0."""
    path = os.pathsep.join([str(GENERATOR.parent), os.environ.get("PATH", "")])
    result = subprocess.run([str(part) for part in command], cwd=cwd, env={**os.environ, "PATH": path},
                            capture_output=True, text=True, timeout=300)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    return output


@pytest.fixture(scope="module")
def generated(tiny_server, tmp_path_factory):
    """The generated package, imported from where pip installed it (and forgotten after the module)."""
    work = tmp_path_factory.mktemp("generated-client")
    response = httpx.get(tiny_server.base_url + "/openapi.json", timeout=30)
    assert response.status_code == 200
    validate(response.json())
    spec = work / "openapi.json"
    spec.write_bytes(response.content)

    project = work / "lmserve-client"
    output = _run([GENERATOR, "generate", "--path", spec, "--output-path", project, "--meta", "setup",
                   "--fail-on-warning"], cwd=work)
    assert "warning" not in output.lower(), output
    assert (project / PACKAGE / "api" / "interactive" / "chat_interactive.py").is_file()

    site = work / "site"
    # No index, no isolated build: the package's setup.py builds with this environment's setuptools,
    # and its dependencies (httpx, attrs) are this environment's.
    _run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index",
          "--no-cache-dir", "--disable-pip-version-check", "--target", site, project], cwd=work)

    with pytest.MonkeyPatch.context() as patch:
        patch.syspath_prepend(str(site))
        package = importlib.import_module(PACKAGE)
        assert Path(package.__file__).is_relative_to(site)
        yield package
    for name in [name for name in sys.modules if name == PACKAGE or name.startswith(PACKAGE + ".")]:
        del sys.modules[name]


@pytest.fixture(scope="module")
def client(generated, tiny_server):
    with generated.Client(base_url=tiny_server.base_url, raise_on_unexpected_status=True,
                          timeout=httpx.Timeout(60.0)) as client:
        yield client


def test_models_parse_into_the_generated_model_list(client):
    from lmserve_client.api.open_ai import models as models_api
    from lmserve_client.models import ModelList

    listed = models_api.sync(client=client)
    assert isinstance(listed, ModelList)
    assert listed.object_ == "list"
    assert [card.id for card in listed.data] == [MODEL]
    assert listed.data[0].object_ == "model" and listed.data[0].max_model_len > 0


def test_a_chat_completion_parses_into_the_generated_models(client, tiny_server):
    from lmserve_client.api.open_ai import chat_completions
    from lmserve_client.models import ChatCompletion, ChatCompletionRequest, ChatMessage, ChatMessageRole

    body = ChatCompletionRequest(model=MODEL, messages=[ChatMessage(role=ChatMessageRole.USER, content="hello there")],
                                 temperature=0.0, max_tokens=OUTPUT_LEN)
    response = chat_completions.sync_detailed(client=client, body=body)
    assert response.status_code == 200
    reply = response.parsed
    assert isinstance(reply, ChatCompletion)
    assert reply.model == MODEL and reply.object_ == "chat.completion" and reply.id
    (choice,) = reply.choices
    assert choice.message.role == "assistant" and isinstance(choice.message.content, str)
    assert choice.finish_reason.value in ("stop", "length")
    usage = reply.usage
    assert usage.prompt_tokens > 0 and 0 < usage.completion_tokens <= OUTPUT_LEN
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    # The generated model serialized the request as JSON: the same body sent by hand gets the same (greedy) reply.
    by_hand = httpx.post(tiny_server.base_url + "/v1/chat/completions", json=body.to_dict(), timeout=60).json()
    assert by_hand["choices"][0]["message"]["content"] == choice.message.content
    assert by_hand["usage"] == usage.to_dict()


def test_interactive_turns_parse_and_count_the_history(client):
    from lmserve_client.api.interactive import chat_interactive
    from lmserve_client.models import InteractiveRequest, InteractiveResponse

    def send(**fields) -> InteractiveResponse:
        response = chat_interactive.sync_detailed(client=client, body=InteractiveRequest(session_id=SESSION_ID,
                                                                                         **fields))
        assert response.status_code == 200, response.content
        assert isinstance(response.parsed, InteractiveResponse)
        return response.parsed

    def end() -> InteractiveResponse:
        return send(prompt="", request_output_len=0, interactive_mode=False)

    end()  # a fresh session, whatever ran before
    turns = []
    for prompt in ("hello there", "and again"):
        turns.append(send(prompt=prompt, interactive_mode=True, stream=False, temperature=0.0,
                          request_output_len=OUTPUT_LEN))
    first, second = turns
    for reply in turns:
        assert reply.input_tokens > 0 and 0 < reply.tokens <= OUTPUT_LEN
        assert reply.finish_reason.value in ("stop", "length")
        assert isinstance(reply.text, str)
    assert first.history_tokens == 0
    assert second.history_tokens == first.input_tokens + first.tokens
    ended = end()
    assert (ended.tokens, ended.input_tokens, ended.history_tokens) == (0, 0, 0)
    assert send(prompt="hi", interactive_mode=False, temperature=0.0, request_output_len=1).history_tokens == 0


def test_errors_parse_into_the_generated_error_response(client):
    from lmserve_client.api.open_ai import chat_completions
    from lmserve_client.models import ChatCompletionRequest, ErrorResponse

    response = chat_completions.sync_detailed(client=client, body=ChatCompletionRequest(model="no-such-model",
                                                                                        messages="hi"))
    assert response.status_code == 404
    error = response.parsed
    assert isinstance(error, ErrorResponse)
    assert error.code == 404 and error.error.code == 404 and "no-such-model" in error.message
