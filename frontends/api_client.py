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

Interactive sessions (``/v1/chat/interactive``) keep a conversation's history
on the server under a ``session_id``; :meth:`APIClient.new_session` gets one
nobody else can guess (lmserve makes it; another server: a random one)::

    session_id = api_client.new_session()
    for text, tokens, finish_reason in api_client.chat("Hello!", session_id=session_id, stream=True):
        print(text, end="", flush=True)
    api_client.end_session(session_id)
"""

from __future__ import annotations

import json
import secrets
import warnings
from functools import cached_property
from typing import Any, Iterator

import httpx

#: Generation can take long; connecting should not.
_TIMEOUT = httpx.Timeout(connect=10.0, read=None, write=60.0, pool=None)
#: Session ids lie in [1, SESSION_ID_BOUND): 53 bits, exact as JavaScript numbers.
SESSION_ID_BOUND = 2**53


def random_session_id() -> int:
    """A session id nobody can guess, for a server that makes none (LMDeploy's)."""
    return 1 + secrets.randbelow(SESSION_ID_BOUND - 1)


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

    def chat_interactive_v1(self, prompt: str | list[dict], image_url: str | list[str] | None = None,
                            session_id: int = -1, interactive_mode: bool = False, stream: bool = False,
                            stop: str | list[str] | None = None, request_output_len: int | None = None,
                            top_p: float = 0.8, top_k: int = 40, temperature: float = 0.8,
                            repetition_penalty: float = 1.0, ignore_eos: bool = False,
                            skip_special_tokens: bool = True, adapter_name: str | None = None,
                            **kwargs) -> Iterator[dict]:
        """``/v1/chat/interactive``: yields ``{text, tokens, input_tokens, history_tokens, finish_reason}``.

        ``interactive_mode=True`` keeps the session's history on the server for
        the next turn; False ends the session after this one. Streaming yields one
        dict per line, ``text`` holding the delta and ``tokens`` the count so far.
        """
        body = {key: value for key, value in locals().items() if key not in ("self", "kwargs")}
        body["kwargs"] = kwargs
        yield from self._post("/v1/chat/interactive", body, stream)

    def chat(self, prompt: str, session_id: int, image_url: str | list[str] | None = None,
             request_output_len: int = 512, stream: bool = False, top_p: float = 0.8, top_k: int = 40,
             temperature: float = 0.8, repetition_penalty: float = 1.0,
             ignore_eos: bool = False) -> Iterator[tuple[str, int, str | None]]:
        """One turn of the session ``session_id``: yields ``(text, tokens, finish_reason)``.

        A tuple has no room for an error body, so one is raised as
        :class:`ErrorReply`. A full session answers ``length`` with no tokens: it
        must be ended (:meth:`end_session`) before it can take another turn.
        """
        assert session_id != -1, "please set a value other than -1"
        for output in self.chat_interactive_v1(prompt, image_url=image_url, session_id=session_id,
                                               interactive_mode=True, stream=stream,
                                               request_output_len=request_output_len, top_p=top_p, top_k=top_k,
                                               temperature=temperature, repetition_penalty=repetition_penalty,
                                               ignore_eos=ignore_eos):
            message = error_message(output)
            if message is not None:
                raise ErrorReply(message, output)
            if is_session_full(output):
                warnings.warn(f"Session {session_id} is full: end it (end_session) to start again.", stacklevel=2)
            yield output["text"], output["tokens"], output["finish_reason"]

    def new_session(self) -> int:
        """A new interactive session's id, one nobody else can guess: reserved by the
        server (lmserve's ``POST /v1/sessions``), or random from a server without that
        route (a 404: LMDeploy's). Its error (e.g. 429: too many sessions) is raised as
        :class:`ErrorReply`; a server that cannot be reached as ``httpx.TransportError``."""
        response = self._client.post(self.api_server_url + "/v1/sessions")
        if response.status_code == 404:
            return random_session_id()
        try:
            body = response.json()
        except ValueError:
            body = None
        if not isinstance(body, dict):
            body = {"code": response.status_code}
        session_id = body.get("session_id")
        if response.status_code != 200 or not isinstance(session_id, int):
            message = error_message(body) or f"POST /v1/sessions answered {response.status_code} without a session_id."
            raise ErrorReply(message, body)
        return session_id

    def end_session(self, session_id: int) -> dict:
        """End the session on the server, dropping its history; the server's reply (or error body)."""
        return list(self.chat_interactive_v1(prompt="", session_id=session_id, request_output_len=0,
                                             interactive_mode=False))[-1]

    def cancel(self, session_id: int) -> dict:
        """Stop the turn the session is generating (``cancel: true``); the server's reply (or error body).

        The session goes on; lmserve keeps what the turn generated in its history.

        ``cancel`` is a top-level field of the request, so it cannot go through
        :meth:`chat_interactive_v1`, which sends extra arguments under ``kwargs``.
        """
        body = {"prompt": "", "session_id": session_id, "interactive_mode": True, "cancel": True}
        return list(self._post("/v1/chat/interactive", body, stream=False))[-1]

    def _post(self, path: str, body: dict, stream: bool) -> Iterator[dict]:
        """POST ``body``; yield each JSON line (SSE ``data:`` prefix stripped, ``[DONE]`` skipped).

        Newline-delimited JSON (``/v1/chat/interactive``'s stream) has no prefix
        to strip.
        """
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


class ErrorReply(RuntimeError):
    """An error body, raised where a method cannot yield it (:meth:`APIClient.chat`)."""

    def __init__(self, message: str, body: dict):
        super().__init__(message)
        self.body = body
        self.code = body.get("code")


def error_message(output: dict) -> str | None:
    """The message of an error body, None for any other reply.

    lmserve sends OpenAI's ``error`` object and LMDeploy's top-level fields;
    LMDeploy itself sends only the latter (``object: "error"``). A turn that
    fails after its stream began ends on a line whose ``error`` is the message.
    """
    error = output.get("error")
    if isinstance(error, dict):
        return str(error.get("message"))
    if isinstance(error, str):
        return error
    if output.get("object") == "error":
        return str(output.get("message"))
    return None


def unreachable(api_client: APIClient, exc: httpx.TransportError) -> str:
    """One line for a request that could not reach the server."""
    return f"cannot reach {api_client.api_server_url}: {str(exc) or type(exc).__name__}"


def no_models_listed(api_client: APIClient) -> str:
    """One line for a server whose model list could not be read at start."""
    return (f"{api_client.api_server_url}/v1/models did not list the served models: "
            "is the server running there, and the API key right?")


def is_session_full(output: dict) -> bool:
    """Whether an interactive reply says the session has no room left: ``length`` with no token generated."""
    return output.get("finish_reason") == "length" and output.get("tokens") == 0
