"""``schemathesis run URL/openapi.json --checks all``, as a new user would run it: no failure.

Every route, every check of schemathesis (status codes, content types, response
schemas and headers, schema-valid requests accepted, schema-invalid ones refused,
undeclared methods answered with 405 and ``Allow``, ...), bounded: a fixed seed and
number of examples per operation, a small context (``--session-len 64``) so that
generations stay short. Two checks are replaced by narrower ones whose exclusions are
named and explained in tests/schemathesis_exclusions.py; nothing else is excused.
``LMSERVE_FUZZ_EXAMPLES=500`` makes a longer hunt.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import LiveServer
from types import SimpleNamespace

import httpx

TESTS = Path(__file__).resolve().parent.parent
EXAMPLES = os.environ.get("LMSERVE_FUZZ_EXAMPLES", "40")
#: The operations of /openapi.json (POST /v1/sessions is the tenth).
OPERATIONS = 10
#: Replaced by the checks of schemathesis_exclusions.py (which run the originals first).
REPLACED = "negative_data_rejection,positive_data_acceptance"


@pytest.fixture(scope="module")
def server(tiny_model_dir):
    server = LiveServer(tiny_model_dir, "--model-name", "tiny", "--session-len", "64")
    yield server
    server.stop()


@pytest.mark.timeout(900)
def test_schemathesis_finds_no_failure(server, tmp_path):
    command = [str(Path(sys.executable).with_name("schemathesis")), "run", server.base_url + "/openapi.json",
               "--checks", "all", "--exclude-checks", REPLACED, "--max-examples", EXAMPLES, "--seed", "1",
               "--request-timeout", "60", "--no-color"]
    env = {**os.environ, "SCHEMATHESIS_HOOKS": "schemathesis_exclusions",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(TESTS), os.environ.get("PYTHONPATH")]))}
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=840)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-12000:]
    assert f"Selected: {OPERATIONS}/{OPERATIONS}" in output and f"Tested: {OPERATIONS}" in output, output[-3000:]
    generated, passed = map(int, re.search(r"(\d+) generated, (\d+) passed", output).groups())
    assert generated == passed > OPERATIONS * int(EXAMPLES) // 2, output[-3000:]


def test_the_replacement_checks_still_fail_what_they_should(server):
    """The exclusions are narrow: a schema-valid body refused for another reason, and a
    schema-invalid one that lax parsing does not make valid, still fail."""
    sys.path.insert(0, str(TESTS))
    try:
        import schemathesis_exclusions as exclusions
    finally:
        sys.path.remove(str(TESTS))
    assert exclusions.UNSTATABLE_LIMITS["a prompt longer than the context"].search(
        "The prompt has 70 tokens, but this model's maximum context length is 64 tokens, which leaves no room")
    assert not any(rule.search("temperature must be in [0, 2], got 5.") for rule in exclusions.UNSTATABLE_LIMITS.values())

    document = httpx.get(server.base_url + "/openapi.json").json()

    def case(body):
        return SimpleNamespace(body=body, operation=SimpleNamespace(
            path="/v1/completions", schema=SimpleNamespace(raw_schema=document)))

    assert exclusions.lax_reading_is_valid(case({"model": "tiny", "prompt": "x", "echo": 0, "max_tokens": "4"}))
    assert not exclusions.lax_reading_is_valid(case({"model": "tiny", "prompt": "x", "temperature": "hot"}))
    assert not exclusions.lax_reading_is_valid(case({"model": "tiny", "prompt": "", "echo": 0}))  # minLength
    assert not exclusions.lax_reading_is_valid(case({"model": "tiny", "prompt": "x", "top_p": 0}))  # exclusiveMinimum
