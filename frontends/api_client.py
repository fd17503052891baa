"""``APIClient``: LMDeploy's Python client, for lmserve (and any LMDeploy-compatible server).

The seed's snippets run unchanged but for the import::

    from lmserve.frontends.api_client import APIClient
    api_client = APIClient("http://127.0.0.1:23333")
    model_name = api_client.available_models[0]
    for item in api_client.chat_completions_v1(model=model_name, messages=[{"role": "user", "content": "hi"}]):
        print(item)

As in LMDeploy, every call is a generator of response dicts (one per stream
event, or one body), and error bodies are yielded, not raised: a caller reads
``item["code"]`` / ``item["error"]``. The request body carries every argument
with its default, extra keyword arguments under a literal ``kwargs`` key, as
LMDeploy's client sends them; servers ignore unknown keys.
"""

from __future__ import annotations

import json
from functools import cached_property
from typing import Any, Iterator

import httpx

#: Generation can take long; connecting should not.
_TIMEOUT = httpx.Timeout(connect=10.0, read=None, write=60.0, pool=None)


class APIClient:
    def __init__(self, api_server_url: str, api_key: str | None = None, **kwargs):
        self.api_server_url = api_server_url.rstrip("/")
        self.headers = {"content-type": "application/json"}
        if api_key is not None:
            self.headers["Authorization"] = f"Bearer {api_key}"
        self._client = httpx.Client(headers=self.headers, timeout=kwargs.get("timeout", _TIMEOUT))

    @cached_property
    def available_models(self) -> list[str] | None:
        """The served model ids (None when the server cannot be asked)."""
        try:
            response = self._client.get(self.api_server_url + "/v1/models")
            return [model["id"] for model in response.json()["data"]]
        except (httpx.HTTPError, ValueError, KeyError, TypeError):
            return None

    def encode(self, input: str | list[str], do_preprocess: bool = False,
               add_bos: bool = True) -> tuple[list, Any]:
        """Token ids and length(s) of ``input`` (``/v1/encode``)."""
        body = {"input": input, "do_preprocess": do_preprocess, "add_bos": add_bos}
        output = self._client.post(self.api_server_url + "/v1/encode", json=body).json()
        return output.get("input_ids"), output.get("length")

    def chat_completions_v1(self, model: str, messages: str | list[dict], temperature: float = 0.7,
                            top_p: float = 1.0, logprobs: bool = False, top_logprobs: int = 0, n: int = 1,
                            max_completion_tokens: int | None = None, max_tokens: int | None = None,
                            stop: str | list[str] | None = None, stream: bool = False,
                            presence_penalty: float = 0.0, frequency_penalty: float = 0.0,
                            user: str | None = None, repetition_penalty: float = 1.0, ignore_eos: bool = False,
                            skip_special_tokens: bool = True, spaces_between_special_tokens: bool = True,
                            top_k: int = 40, min_new_tokens: int | None = None, min_p: float = 0.0,
                            logit_bias: dict | None = None, stream_options: dict | None = None,
                            **kwargs) -> Iterator[dict]:
        """``/v1/chat/completions``: yields the body, or each stream chunk."""
        body = {key: value for key, value in locals().items() if key not in ("self", "kwargs")}
        body["kwargs"] = kwargs
        yield from self._post("/v1/chat/completions", body, stream)

    def completions_v1(self, model: str, prompt: str | list, suffix: str | None = None,
                       temperature: float = 0.7, n: int = 1, max_completion_tokens: int | None = 16,
                       max_tokens: int | None = 16, stream: bool = False, stop: str | list[str] | None = None,
                       top_p: float = 1.0, top_k: int = 40, user: str | None = None,
                       repetition_penalty: float = 1.0, ignore_eos: bool = False, skip_special_tokens: bool = True,
                       spaces_between_special_tokens: bool = True, stream_options: dict | None = None,
                       **kwargs) -> Iterator[dict]:
        """``/v1/completions``: yields the body, or each stream chunk."""
        body = {key: value for key, value in locals().items() if key not in ("self", "kwargs")}
        body["kwargs"] = kwargs
        yield from self._post("/v1/completions", body, stream)

    def _post(self, path: str, body: dict, stream: bool) -> Iterator[dict]:
        """POST ``body``; yield each JSON line (SSE ``data:`` prefix stripped, ``[DONE]`` skipped)."""
        with self._client.stream("POST", self.api_server_url + path, json=body) as response:
            for line in response.iter_lines():
                line = line.strip()
                if not line or line == "data: [DONE]":
                    continue
                if line.startswith("data:"):
                    line = line[len("data:"):].strip()
                try:
                    yield json.loads(line)
                except ValueError:
                    yield {"error": {"message": f"Not JSON: {line[:200]!r}"}, "code": response.status_code}

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> APIClient:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()
