"""``lmserve serve api_server`` on the real model with ``--tp``: 3 ranks answer the openai client, 2 are refused."""

import subprocess

import openai
import pytest

from lmserve.plugins.pytest_plugin import LMSERVE, free_port

pytestmark = pytest.mark.real_model


def test_three_ranks_answer_the_openai_client(lmserve_server_factory, smollm2_gguf):
    server = lmserve_server_factory("--tp", "3", "--model-name", "smollm2", model=smollm2_gguf)
    client = openai.OpenAI(base_url=server.base_url + "/v1", api_key="unused")
    reply = client.chat.completions.create(model="smollm2", temperature=0, max_tokens=24,
                                           messages=[{"role": "user", "content": "What is the capital of France?"}])
    assert "Paris" in reply.choices[0].message.content
    server.stop()
    assert server.process.returncode == 0


def test_two_ranks_are_refused_naming_1_3_and_9(smollm2_gguf):
    result = subprocess.run([*LMSERVE, "serve", "api_server", str(smollm2_gguf), "--tp", "2",
                             "--server-port", str(free_port())], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "valid sizes: 1, 3, 9." in result.stderr
    assert "Loading weights" not in result.stderr  # refused before any rank starts
