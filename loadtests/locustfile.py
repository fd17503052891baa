"""Load test for a running lmserve: `locust -f loadtests/locustfile.py --host http://127.0.0.1:23333`.

Each simulated user sends streaming and non-streaming chat completions with
prompts of mixed length. MODEL (env) picks the model name; default: the first
one /v1/models lists.
"""

import os
import random

from locust import HttpUser, between, task

PROMPTS = [
    "Say hi.",
    "What is the capital of France?",
    "Write a short poem about the sea and the wind.",
    "Explain, step by step, how a hash map handles collisions, with an example in Python.",
]


class ChatUser(HttpUser):
    wait_time = between(0.1, 0.5)

    def on_start(self):
        self.model = os.environ.get("MODEL") or self.client.get("/v1/models").json()["data"][0]["id"]

    def _body(self, stream: bool) -> dict:
        return {
            "model": self.model,
            "messages": [{"role": "user", "content": random.choice(PROMPTS)}],
            "max_tokens": random.choice([16, 64, 128]),
            "stream": stream,
        }

    @task(2)
    def chat(self):
        self.client.post("/v1/chat/completions", json=self._body(False), name="chat")

    @task(1)
    def chat_stream(self):
        with self.client.post("/v1/chat/completions", json=self._body(True), stream=True,
                              name="chat (stream)", catch_response=True) as response:
            last = None
            for line in response.iter_lines():
                if line:
                    last = line
            if last != b"data: [DONE]":
                response.failure(f"stream did not end with [DONE]: {last!r}")
