"""The Python APIClient against a live server: the seed's snippets, streams, errors as dicts, sessions."""

import json
from itertools import pairwise

import httpx
import pytest

from conftest import LiveServer, free_port
from lmserve.frontends.api_client import APIClient, ErrorReply, is_session_full

#: The seed's interactive snippet: four turns of one conversation.
MESSAGES = [
    "hi, what's your name?",
    "who developed you?",
    "Tell me more about your developers",
    "Summarize the information we've talked so far",
]
ZERO_REPLY = {"text": "", "tokens": 0, "input_tokens": 0, "history_tokens": 0, "finish_reason": "stop"}


@pytest.fixture(scope="module")
def api_client(tiny_server):
    with APIClient(tiny_server.base_url) as client:
        yield client


def test_the_seeds_chat_completions_snippet(api_client):
    model_name = api_client.available_models[0]
    messages = [{"role": "user", "content": "Say this is a test!"}]
    items = list(api_client.chat_completions_v1(model=model_name, messages=messages, max_tokens=8))
    assert len(items) == 1
    reply = items[0]
    assert reply["object"] == "chat.completion" and reply["choices"][0]["message"]["role"] == "assistant"
    assert 0 < reply["usage"]["completion_tokens"] <= 8


def test_the_seeds_completions_snippet(api_client):
    model_name = api_client.available_models[0]
    items = list(api_client.completions_v1(model=model_name, prompt="hi"))
    assert len(items) == 1 and items[0]["object"] == "text_completion"
    assert items[0]["usage"]["completion_tokens"] <= 16  # the client's default max_tokens


def test_streams_yield_every_chunk_and_add_up_to_the_body(api_client):
    common = dict(model="tiny", prompt="abc", max_tokens=6, temperature=0, ignore_eos=True)
    whole = next(api_client.completions_v1(**common))["choices"][0]["text"]
    chunks = list(api_client.completions_v1(**common, stream=True))
    assert all(chunk["object"] == "text_completion" for chunk in chunks)
    assert "".join(chunk["choices"][0]["text"] for chunk in chunks) == whole
    chat_chunks = list(api_client.chat_completions_v1(model="tiny", messages="raw", max_tokens=4, stream=True,
                                                      logprobs=True, top_logprobs=2))
    assert chat_chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert any(chunk["choices"][0]["logprobs"] for chunk in chat_chunks[1:])


def test_errors_are_yielded_not_raised(api_client):
    items = list(api_client.chat_completions_v1(model="no-such-model", messages=[{"role": "user", "content": "x"}]))
    assert items[0]["code"] == 404 and items[0]["error"]["param"] == "model"
    items = list(api_client.completions_v1(model="tiny", prompt="x", temperature=5))
    assert items[0]["code"] == 400 and items[0]["param"] == "temperature"


def test_extra_keyword_arguments_travel_under_kwargs_and_are_ignored(api_client):
    items = list(api_client.chat_completions_v1(model="tiny", messages="x", max_tokens=2, adapter_name="none"))
    assert items[0]["object"] == "chat.completion"


def test_encode(api_client):
    ids, length = api_client.encode("hello world")
    assert length == len(ids) > 0
    ids, lengths = api_client.encode(["a", "bc"], add_bos=False)
    assert lengths == [len(item) for item in ids]


def test_available_models_is_none_when_the_server_cannot_be_reached():
    assert APIClient(f"http://127.0.0.1:{free_port()}").available_models is None


# Interactive sessions (/v1/chat/interactive). Each test has a session id of its own.


def client_recording_bodies(reply: str) -> tuple[APIClient, list[dict]]:
    """An APIClient whose requests get ``reply`` without a server; the list collects their bodies."""
    bodies = []

    def answer(request: httpx.Request) -> httpx.Response:
        bodies.append(json.loads(request.content))
        return httpx.Response(200, text=reply)

    client = APIClient("http://server")
    client._client = httpx.Client(transport=httpx.MockTransport(answer))
    return client, bodies


def test_chat_interactive_v1_sends_every_argument_and_yields_each_line():
    lines = [{**ZERO_REPLY, "text": "a", "tokens": 1, "finish_reason": None}, {**ZERO_REPLY, "text": "b", "tokens": 2}]
    client, bodies = client_recording_bodies("\n".join(json.dumps(line) for line in lines) + "\n\n")
    assert list(client.chat_interactive_v1("hi", session_id=3, stream=True, seed=7)) == lines
    assert bodies == [{"prompt": "hi", "image_url": None, "session_id": 3, "interactive_mode": False, "stream": True,
                       "stop": None, "request_output_len": None, "top_p": 0.8, "top_k": 40, "temperature": 0.8,
                       "repetition_penalty": 1.0, "ignore_eos": False, "skip_special_tokens": True,
                       "adapter_name": None, "kwargs": {"seed": 7}}]


def test_end_session_and_cancel_send_lmdeploys_bodies():
    client, bodies = client_recording_bodies(json.dumps(ZERO_REPLY))
    assert client.end_session(3) == ZERO_REPLY
    assert {key: bodies[0][key] for key in ("prompt", "session_id", "request_output_len", "interactive_mode")} == {
        "prompt": "", "session_id": 3, "request_output_len": 0, "interactive_mode": False}
    assert client.cancel(3) == ZERO_REPLY
    assert bodies[1] == {"prompt": "", "session_id": 3, "interactive_mode": True, "cancel": True}


def assert_history_adds_up(replies: list[dict]) -> None:
    """Each turn's history is the one before plus that turn's prompt and reply; a turn that
    found the session full added nothing."""
    for before, after in pairwise(replies):
        added = 0 if is_session_full(before) else before["input_tokens"] + before["tokens"]
        assert after["history_tokens"] == before["history_tokens"] + added


def test_session_turns_add_up_in_the_history(api_client):
    replies = []
    for message in MESSAGES:
        items = list(api_client.chat_interactive_v1(prompt=message, session_id=101, interactive_mode=True,
                                                    stream=False, request_output_len=8))
        assert len(items) == 1 and set(items[0]) == set(ZERO_REPLY)
        assert items[0]["input_tokens"] > 0 and 0 < items[0]["tokens"] <= 8
        replies.append(items[0])
    assert replies[0]["history_tokens"] == 0
    assert_history_adds_up(replies)
    assert api_client.end_session(101) == ZERO_REPLY


@pytest.fixture(scope="module")
def short_smollm2_server(smollm2_gguf):
    """The real model with room for a few turns only: a turn takes all the room left, and the
    model may ramble; 1024 tokens bound the test's time."""
    server = LiveServer("HuggingFaceTB/SmolLM2-135M-Instruct", "--session-len", "1024")
    yield server
    server.stop()


@pytest.mark.real_model
def test_the_seeds_interactive_snippet(short_smollm2_server):
    """Unchanged but for the import and the URL; every turn's history builds on the one before."""
    api_client = APIClient(short_smollm2_server.base_url)
    replies = []
    for message in MESSAGES:
        for item in api_client.chat_interactive_v1(prompt=message, session_id=1, interactive_mode=True, stream=False):
            print(item)
            replies.append(item)
    assert len(replies) == 4 and all(set(reply) == set(ZERO_REPLY) for reply in replies)
    assert replies[0]["history_tokens"] == 0 and replies[0]["tokens"] > 0 and replies[0]["text"]
    assert all(reply["finish_reason"] in ("stop", "length") for reply in replies)
    assert_history_adds_up(replies)
    assert api_client.end_session(1) == ZERO_REPLY


def test_chat_streams_text_tokens_and_finish_reason(api_client):
    whole = list(api_client.chat("Hello!", session_id=102, request_output_len=6, ignore_eos=True))
    assert len(whole) == 1 and whole[0][1:] == (6, "length") and whole[0][0]
    deltas = list(api_client.chat("And again", session_id=102, request_output_len=6, stream=True, ignore_eos=True))
    assert [tokens for _, tokens, _ in deltas][-1] == 6
    assert [finish_reason for _, _, finish_reason in deltas] == [None] * (len(deltas) - 1) + ["length"]
    assert "".join(text for text, _, _ in deltas)
    api_client.end_session(102)


def test_the_stream_is_newline_delimited_json_with_cumulative_tokens(api_client):
    items = list(api_client.chat_interactive_v1("abc", session_id=103, interactive_mode=True, stream=True,
                                                request_output_len=5, ignore_eos=True))
    tokens = [item["tokens"] for item in items]
    assert tokens == sorted(tokens) and tokens[-1] == 5
    assert all(set(item) == set(ZERO_REPLY) for item in items)
    api_client.end_session(103)


def test_end_session_drops_the_history(api_client):
    first = next(api_client.chat_interactive_v1("one", session_id=104, interactive_mode=True, request_output_len=3))
    second = next(api_client.chat_interactive_v1("two", session_id=104, interactive_mode=True, request_output_len=3))
    assert second["history_tokens"] == first["input_tokens"] + first["tokens"] > 0
    assert api_client.end_session(104) == ZERO_REPLY
    again = next(api_client.chat_interactive_v1("one", session_id=104, interactive_mode=True, request_output_len=3))
    assert again["history_tokens"] == 0
    api_client.end_session(104)


def test_a_full_session_answers_length_with_no_tokens_and_chat_warns(api_client):
    """The tiny model's context is 256 tokens: one turn given all the room left fills the session."""
    filled = next(api_client.chat_interactive_v1("fill", session_id=105, interactive_mode=True, ignore_eos=True))
    assert filled["finish_reason"] == "length" and filled["tokens"] > 0
    with pytest.warns(UserWarning, match="Session 105 is full"):
        assert list(api_client.chat("more", session_id=105)) == [("", 0, "length")]
    assert api_client.end_session(105) == ZERO_REPLY
    assert next(api_client.chat("more", session_id=105, request_output_len=2))[1] > 0
    api_client.end_session(105)


def test_interactive_errors_are_yielded_and_chat_raises_them(api_client):
    items = list(api_client.chat_interactive_v1("x", session_id=106, temperature=5))
    assert len(items) == 1 and items[0]["code"] == 400 and items[0]["error"]["code"] == 400
    with pytest.raises(ErrorReply) as raised:
        next(api_client.chat("x", session_id=106, temperature=5))
    assert raised.value.code == 400 and str(raised.value) == items[0]["error"]["message"]


def test_a_busy_session_is_a_409(api_client):
    turn = api_client.chat_interactive_v1("long", session_id=107, interactive_mode=True, stream=True,
                                          request_output_len=200, ignore_eos=True)
    next(turn)  # the turn is generating
    items = list(api_client.chat_interactive_v1("meanwhile", session_id=107, interactive_mode=True))
    assert items[0]["code"] == 409 and items[0]["error"]["code"] == 409
    turn.close()
    api_client.cancel(107)
    api_client.end_session(107)


def test_chat_needs_a_session():
    with pytest.raises(AssertionError):
        next(APIClient(f"http://127.0.0.1:{free_port()}").chat("hi", session_id=-1))


def test_new_session_is_an_id_the_server_reserved(api_client):
    ids = {api_client.new_session() for _ in range(3)}
    assert len(ids) == 3 and all(0 < session_id < 2**53 for session_id in ids)
    for session_id in ids:
        assert api_client.end_session(session_id) == ZERO_REPLY


@pytest.mark.parametrize("status, raises", [(404, False), (429, True), (401, True)])
def test_new_session_is_random_from_a_server_without_the_route_and_raises_its_errors(status, raises):
    body = {"error": {"message": "no", "code": status}, "code": status} if raises else {"detail": "Not Found"}
    client = APIClient("http://server")
    client._client = httpx.Client(transport=httpx.MockTransport(lambda request: httpx.Response(status, json=body)))
    if raises:
        with pytest.raises(ErrorReply) as error:
            client.new_session()
        assert error.value.code == status and str(error.value) == "no"
    else:
        assert len({client.new_session() for _ in range(10)}) == 10

