"""The web UI's actions (:class:`WebChat`) against live servers, without a browser; the page itself
is driven in Chromium by test_webui_browser.py."""


import httpx
import pytest

from conftest import LiveServer, free_port
from lmserve.frontends.api_client import APIClient

webui = pytest.importorskip("lmserve.frontends.webui", reason="the web UI is an extra: pip install 'lmserve[webui]'")


def session_history(server, session_id: int) -> int:
    """The session's history on the server; the probe ends the session."""
    with APIClient(server.base_url) as api_client:
        return next(api_client.chat_interactive_v1("?", session_id=session_id, interactive_mode=False,
                                                   request_output_len=0))["history_tokens"]


@pytest.fixture(scope="module")
def long_server(long_model_dir):
    """The tiny model with a 32k-token context: a turn long enough to meet a second one."""
    server = LiveServer(long_model_dir, "--model-name", "tiny")
    yield server
    server.stop()


@pytest.fixture
def web_chat(tiny_server):
    with APIClient(tiny_server.base_url) as api_client:
        yield webui.WebChat(api_client)


def test_a_turn_streams_into_the_chat_and_stays_in_the_session(web_chat, tiny_server):
    updates = list(web_chat.send("Hello", [], 41, max_new_tokens=8, temperature=0, top_p=1))
    chat, box, status = updates[-1]
    assert chat[0] == {"role": "user", "content": "Hello"} and chat[1]["role"] == "assistant"
    assert box == "" and not status.startswith("Error")
    assert len(updates) >= 3, "the reply came in more than one piece"
    again = list(web_chat.send("More", chat, 41, max_new_tokens=8, temperature=0, top_p=1))[-1][0]
    assert [message["content"] for message in again[:2]] == ["Hello", chat[1]["content"]] and len(again) == 4
    assert session_history(tiny_server, 41) > 0


def test_an_empty_message_sends_nothing(web_chat):
    assert list(web_chat.send("  ", [], 42, 8, 0, 1)) == [([], "  ", "")]


def test_a_second_turn_while_one_runs_shows_the_servers_409(web_chat, long_server):
    with APIClient(long_server.base_url) as api_client:
        chat = webui.WebChat(api_client)
        running = chat.send("a long one", [], 43, max_new_tokens=2048, temperature=0, top_p=1)
        next(running), next(running)  # the turn runs on the server
        chat_after, box, status = list(chat.send("meanwhile", [], 43, 8, 0, 1))[-1]
        assert status.startswith("Error:") and "43" in status, status
        assert chat_after == [] and box == "meanwhile", "the refused message goes back to the box"
        assert chat.cancel(43) == "Cancelled."
        *_, (final_chat, _, final_status) = running
        assert final_status == "Cancelled." and final_chat[-1]["content"]
        assert chat.reset(43) == ([], "", "New session.")
        assert session_history(long_server, 43) == 0


def test_a_full_session_says_to_press_reset(web_chat, tiny_server):
    """The tiny server's context is 256 tokens; a turn given all the room left fills it."""
    with APIClient(tiny_server.base_url) as api_client:
        next(api_client.chat_interactive_v1("fill", session_id=44, interactive_mode=True, ignore_eos=True))
    *_, (chat, box, status) = web_chat.send("more", [], 44, 8, 0, 1)
    assert status == "The session is full: press Reset to start a new one."
    web_chat.reset(44)
    *_, (chat, box, status) = web_chat.send("more", [], 44, 8, 0, 1)
    assert "full" not in status


def test_an_unreachable_server_is_one_line_in_the_page():
    with APIClient(f"http://127.0.0.1:{free_port()}") as api_client:
        chat = webui.WebChat(api_client)
        *_, (messages, box, status) = chat.send("hi", [], 1, 8, 0, 1)
        assert status.startswith("Error: cannot reach http://127.0.0.1:")
        assert chat.cancel(1).startswith("Error: cannot reach")
        assert chat.reset(1)[2].startswith("Error: cannot reach")


def test_each_tab_gets_a_session_of_its_own_that_the_server_made(web_chat, tiny_server):
    ids = {web_chat.open_tab()[0] for _ in range(50)}
    assert len(ids) == 50 and all(0 < session_id < 2**53 for session_id in ids)
    session_id, label = web_chat.open_tab()
    assert label == f"Session {session_id}"
    taken = httpx.post(tiny_server.base_url + "/v1/chat/completions", json={  # reserved: no other API takes it
        "model": "tiny", "messages": "x", "max_tokens": 1, "session_id": session_id})
    assert taken.status_code == 409
    for closed in [*ids, session_id]:
        web_chat.end(closed)


def test_a_tab_on_a_server_that_makes_no_ids_gets_a_random_one():
    """LMDeploy's server has no ``POST /v1/sessions``: its 404 means "choose one yourself"."""
    api_client = APIClient("http://server")
    api_client._client = httpx.Client(transport=httpx.MockTransport(lambda request: httpx.Response(404)))
    ids = {webui.WebChat(api_client).open_tab()[0] for _ in range(20)}
    assert len(ids) == 20 and all(0 < session_id < 2**53 for session_id in ids)


def test_the_command_fails_in_one_line_without_a_server(capsys):
    from lmserve.frontends.cli import main

    url = f"http://127.0.0.1:{free_port()}"
    assert main(["serve", "gradio", url, "--server-port", str(free_port())]) == 1
    assert capsys.readouterr().err.strip() == (f"lmserve: error: {url}/v1/models did not list the served models: "
                                               "is the server running there, and the API key right?")


class _ThinkingClient:
    """Streams a thinking model's turn as a server with a reasoning parser sends it."""

    api_server_url = "http://fake"

    def chat_interactive_v1(self, prompt, **generation):
        for reasoning, text, finish_reason in (("Let me", "", None), (" see.", "", None), ("", "Hi", None),
                                                ("", "!", "stop")):
            yield {"text": text, "reasoning_content": reasoning, "tokens": 1, "input_tokens": 3,
                   "history_tokens": 0, "finish_reason": finish_reason}


def test_a_thinking_models_reasoning_goes_in_a_folded_message_before_the_answer():
    chat, box, status = list(webui.WebChat(_ThinkingClient()).send("Hello", [], 7, 8, 0, 1))[-1]
    assert chat == [{"role": "user", "content": "Hello"},
                    {"role": "assistant", "content": "Let me see.", "metadata": {"title": webui.THINKING_TITLE}},
                    {"role": "assistant", "content": "Hi!"}]
    assert box == "" and not status.startswith("Error")
