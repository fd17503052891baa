"""Load test of a running lmserve: ``locust -f loadtests/locustfile.py --host http://127.0.0.1:23333``.

Users, by weight:

- :class:`ChatUser`: chat completions, streamed (with usage) and not; a sample of the
  answers is re-tokenized through ``/tokenize`` to check the usage against the text.
- :class:`CompletionUser`: ``/v1/completions`` with prompt lists, ``echo`` and ``logprobs``.
- :class:`SessionUser`: interactive sessions (``/v1/chat/interactive``): 2 to 4 turns,
  each checking that ``history_tokens`` grew by exactly the last turn, then the end.
- :class:`DisconnectingUser`: streams that the client drops after a few chunks.
- :class:`BadRequestUser`: requests that must be refused with their 4xx.

Every response is checked (``loadtests/checks.py``); a problem fails the request.
Time to first token and each stream's tokens/s are reported as extra rows (``TTFT``
and ``TOKENS/S``, in ms and tokens/s). MODEL (env) names the model; default: the
first one /v1/models lists. LOAD_SHAPE=ramp|steady|spike (env) picks a load shape
for USERS users (default 16) over DURATION seconds (default 60) instead of -u/-r/-t.
"""

from __future__ import annotations

import itertools
import json
import os
import random
import sys
import time
from pathlib import Path

from locust import HttpUser, LoadTestShape, between, events, task

sys.path.insert(0, str(Path(__file__).parent))
from checks import (  # noqa: E402  (loadtests/ is not a package)
    check_chat,
    check_chat_stream,
    check_completions,
    check_error,
    check_interactive_stream,
    check_retokenized,
)

PROMPTS = [
    "Say hi.",
    "What is the capital of France?",
    "Write a short poem about the sea and the wind.",
    "Explain, step by step, how a hash map handles collisions, with an example in Python.",
    "用一句话介绍你自己。",
]
#: Every how many non-streamed chats one is re-tokenized through /tokenize.
RETOKENIZE_EVERY = 4
_session_ids = itertools.count(1_000_000 + os.getpid() % 1000 * 10_000)


def _metric(name: str, value: float) -> None:
    events.request.fire(request_type=name, name=name, response_time=value, response_length=0, exception=None,
                        context={})


class _LmserveUser(HttpUser):
    abstract = True
    wait_time = between(0.1, 0.5)

    def on_start(self):
        self.model = os.environ.get("MODEL") or self.client.get("/v1/models").json()["data"][0]["id"]

    def _fail_on(self, response, problems: list[str]) -> None:
        if problems:
            response.failure("; ".join(problems)[:500])
        else:
            response.success()


class ChatUser(_LmserveUser):
    weight = 4
    chats = 0

    def _body(self, **extra) -> dict:
        max_tokens = random.choice([16, 48, 96])
        return {"model": self.model, "messages": [{"role": "user", "content": random.choice(PROMPTS)}],
                "max_tokens": max_tokens, "temperature": random.choice([0.0, 0.7]), **extra}

    @task(2)
    def chat(self):
        body = self._body()
        with self.client.post("/v1/chat/completions", json=body, name="chat", catch_response=True) as response:
            if response.status_code != 200:
                return self._fail_on(response, [f"status {response.status_code}: {response.text[:200]}"])
            answer = response.json()
            problems = check_chat(answer, body["max_tokens"])
            ChatUser.chats += 1
            if not problems and ChatUser.chats % RETOKENIZE_EVERY == 0:
                problems = self._retokenize(answer)
            self._fail_on(response, problems)

    def _retokenize(self, answer: dict) -> list[str]:
        text, finish = answer["choices"][0]["message"]["content"], answer["choices"][0]["finish_reason"]
        counted = self.client.post("/tokenize", json={"model": self.model, "prompt": text, "add_special_tokens": False},
                                   name="/tokenize").json()
        return check_retokenized(text, answer["usage"]["completion_tokens"], finish, counted["count"])

    @task(2)
    def chat_stream(self):
        body = self._body(stream=True, stream_options={"include_usage": True})
        start = time.monotonic()
        first = None
        lines = []
        with self.client.post("/v1/chat/completions", json=body, stream=True, name="chat (stream)",
                              catch_response=True) as response:
            if response.status_code != 200:
                return self._fail_on(response, [f"status {response.status_code}"])
            for line in response.iter_lines(decode_unicode=True):
                if first is None and '"content":"' in line and '"content":""' not in line:
                    first = time.monotonic()
                lines.append(line)
            text, problems = check_chat_stream(lines, body["max_tokens"])
            self._fail_on(response, problems)
        if first is not None and not problems:
            end = time.monotonic()
            _metric("TTFT", (first - start) * 1000)
            usage = json.loads(next(line for line in reversed(lines) if '"usage"' in line)[6:])["usage"]
            if end > first and usage["completion_tokens"] > 1:
                _metric("TOKENS/S", (usage["completion_tokens"] - 1) / (end - first))


class CompletionUser(_LmserveUser):
    weight = 2

    @task
    def completions(self):
        prompts = random.sample(PROMPTS, random.choice([1, 2, 3]))
        echo, logprobs = random.random() < 0.3, random.random() < 0.5
        body = {"model": self.model, "prompt": prompts, "max_tokens": random.choice([8, 32]), "echo": echo,
                "temperature": 0.0}
        if logprobs:
            body["logprobs"] = 2
        with self.client.post("/v1/completions", json=body, name="completions", catch_response=True) as response:
            if response.status_code != 200:
                return self._fail_on(response, [f"status {response.status_code}: {response.text[:200]}"])
            self._fail_on(response, check_completions(response.json(), len(prompts), body["max_tokens"],
                                                      echo_prefixes=prompts if echo else None, logprobs=logprobs))


class SessionUser(_LmserveUser):
    weight = 2
    session_id = None

    def on_stop(self):
        if self.session_id is not None:  # stopped mid-session: end it, so the server keeps nothing
            self._end_session()

    def _end_session(self):
        end = {"prompt": "", "session_id": self.session_id, "interactive_mode": False, "request_output_len": 0}
        self.session_id = None
        with self.client.post("/v1/chat/interactive", json=end, name="interactive end",
                              catch_response=True) as response:
            self._fail_on(response, [] if response.status_code == 200 else [f"status {response.status_code}"])

    @task
    def session(self):
        self.session_id = session_id = next(_session_ids)
        history = 0
        for turn in range(random.randint(2, 4)):
            body = {"prompt": random.choice(PROMPTS), "session_id": session_id, "interactive_mode": True,
                    "stream": True, "request_output_len": random.choice([8, 24]), "temperature": 0.0}
            with self.client.post("/v1/chat/interactive", json=body, stream=True, name="interactive turn",
                                  catch_response=True) as response:
                if response.status_code != 200:
                    return self._fail_on(response, [f"status {response.status_code}: {response.text[:200]}"])
                last, problems = check_interactive_stream(response.iter_lines(decode_unicode=True), history)
                self._fail_on(response, problems)
                if problems:
                    break
                history += last["input_tokens"] + last["tokens"]
        self._end_session()


class DisconnectingUser(_LmserveUser):
    weight = 1

    @task
    def drop_a_stream(self):
        body = {"model": self.model, "messages": [{"role": "user", "content": random.choice(PROMPTS)}],
                "max_tokens": 200, "stream": True, "ignore_eos": True}
        with self.client.post("/v1/chat/completions", json=body, stream=True, name="chat (dropped)",
                              catch_response=True) as response:
            if response.status_code != 200:
                return self._fail_on(response, [f"status {response.status_code}"])
            for count, _ in enumerate(response.iter_lines(), 1):
                if count >= random.randint(2, 6):
                    break
            response.success()
        # Leaving the block closes the connection mid-stream: the server must abort the request.


class BadRequestUser(_LmserveUser):
    weight = 1

    CASES = [
        ("no messages", "/v1/chat/completions", lambda model: {"model": model}, 400),
        ("unknown model", "/v1/chat/completions",
         lambda model: {"model": "no-such-model", "messages": [{"role": "user", "content": "hi"}]}, 404),
        ("negative max_tokens", "/v1/completions", lambda model: {"model": model, "prompt": "hi", "max_tokens": -1}, 400),
        ("temperature out of range", "/v1/chat/completions",
         lambda model: {"model": model, "messages": [{"role": "user", "content": "hi"}], "temperature": 9}, 400),
    ]

    @task
    def bad_request(self):
        label, path, body, status = random.choice(self.CASES)
        with self.client.post(path, json=body(self.model), name=f"bad: {label}", catch_response=True) as response:
            try:
                answer = response.json()
            except ValueError:
                answer = None
            self._fail_on(response, check_error(response.status_code, answer, status))

    @task
    def not_json(self):
        with self.client.post("/v1/chat/completions", data=b"{not json", headers={"Content-Type": "application/json"},
                              name="bad: not JSON", catch_response=True) as response:
            try:
                answer = response.json()
            except ValueError:
                answer = None
            self._fail_on(response, check_error(response.status_code, answer, 400))


if os.environ.get("LOAD_SHAPE"):
    class SelectedShape(LoadTestShape):
        """ramp: up to USERS over DURATION; steady: USERS throughout; spike: a quarter of
        USERS, all of them for the middle fifth, then a quarter again."""

        shape = os.environ["LOAD_SHAPE"]
        users = int(os.environ.get("USERS", "16"))
        duration = float(os.environ.get("DURATION", "60"))

        def tick(self):
            elapsed = self.get_run_time()
            if elapsed > self.duration:
                return None
            if self.shape == "ramp":
                return max(1, round(self.users * elapsed / self.duration)), self.users
            if self.shape == "spike" and not 0.4 <= elapsed / self.duration < 0.6:
                return max(1, self.users // 4), self.users
            return self.users, self.users
