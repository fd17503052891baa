"""``lmserve serve api_client``: the chat loop against a fake server, then the command against a live one.

Also the server's flag for sessions, ``--session-ttl``.
"""

import io
import os
import re
import select
import subprocess
import time

import httpx
import pytest

from conftest import LMSERVE, LiveServer, free_port
from lmserve.frontends.api_client import APIClient, ErrorReply
from lmserve.core.plugins import create_plugin_manager
from lmserve.frontends.cli import build_parser, main
from lmserve.frontends.terminal_chat import PROMPT, chat_in_terminal, read_prompt

ZERO_REPLY = {"text": "", "tokens": 0, "input_tokens": 0, "history_tokens": 0, "finish_reason": "stop"}


class FakeClient:
    """Records what the chat sends; replies with ``replies`` (a list of stream lines, or an exception) per turn."""

    api_server_url = "http://fake"

    def __init__(self, *replies, end_reply=ZERO_REPLY):
        self.replies = list(replies)
        self.end_reply = end_reply
        self.calls = []

    def chat_interactive_v1(self, prompt, session_id, interactive_mode, stream, **generation):
        self.calls.append(("turn", prompt, session_id, interactive_mode, stream))
        self.generation = generation
        for line in self.replies.pop(0):
            if isinstance(line, BaseException):
                raise line
            yield line

    def end_session(self, session_id):
        self.calls.append(("end", session_id))
        if isinstance(self.end_reply, BaseException):
            raise self.end_reply
        return self.end_reply

    def cancel(self, session_id):
        self.calls.append(("cancel", session_id))
        return ZERO_REPLY

    def new_session(self):
        self.calls.append(("new",))
        if isinstance(self.new_session_reply, BaseException):
            raise self.new_session_reply
        return self.new_session_reply

    new_session_reply = 2**52 + 7


def delta(text, tokens, finish_reason=None):
    return {"text": text, "tokens": tokens, "input_tokens": 3, "history_tokens": 0, "finish_reason": finish_reason}


def chat(client, typed: str, session_id: int = 1) -> tuple[int, str]:
    stdout = io.StringIO()
    status = chat_in_terminal(client, session_id, io.StringIO(typed), stdout)
    return status, stdout.getvalue()


def test_lines_up_to_an_empty_one_make_one_prompt():
    stdin = io.StringIO("first line\r\nsecond line\n\nnext\n")
    stdout = io.StringIO()
    assert read_prompt(stdin, stdout) == "first line\nsecond line"
    assert stdout.getvalue() == PROMPT and "double enter to end input >>> " in PROMPT
    assert read_prompt(io.StringIO("\n"), stdout) == ""  # nothing typed: nothing to send
    assert read_prompt(io.StringIO("typed, then Ctrl-D"), stdout) == "typed, then Ctrl-D"
    assert read_prompt(io.StringIO(""), stdout) is None


def test_a_turn_streams_its_deltas_then_end_and_exit_end_the_session():
    client = FakeClient([delta("Hel", 1), delta("lo!", 2, "stop")], [delta("Again", 1, "stop")])
    status, out = chat(client, "hi\nthere\n\n\n end \n\nsecond\n\nexit\n\n", session_id=4)
    assert status == 0
    assert client.calls == [("turn", "hi\nthere", 4, True, True), ("end", 4),
                            ("turn", "second", 4, True, True), ("end", 4)]
    assert "Hello!\n" in out and "Session 4 ended; the next prompt starts a new one." in out
    assert out.index("Hello!") < out.index("ended") < out.index("Again")


def test_a_thinking_models_reasoning_is_framed_before_its_answer():
    def thought(reasoning, text, tokens, finish_reason=None):
        return {**delta(text, tokens, finish_reason), "reasoning_content": reasoning}

    client = FakeClient([thought("Let me", "", 1), thought(" see.", "", 2), thought("", "Hi", 3),
                         thought("", "!", 4, "stop")],
                        [thought("only thoughts", "", 1, "length")])
    status, out = chat(client, "hi\n\nagain\n\nexit\n\n")
    assert status == 0
    assert "[thinking]\nLet me see.\n[/thinking]\nHi!\n" in out
    assert "[thinking]\nonly thoughts\n" in out  # cut inside its reasoning: still shown


def test_the_end_of_the_input_quits_like_exit():
    client = FakeClient()
    assert chat(client, "")[0] == 0
    assert client.calls == [("end", 1)]


def test_ctrl_c_during_a_reply_cancels_the_turn_and_the_chat_goes_on():
    client = FakeClient([delta("partial", 1), KeyboardInterrupt()], [delta("next", 1, "stop")])
    status, out = chat(client, "long story\n\nafter\n\n")
    assert status == 0
    assert client.calls == [("turn", "long story", 1, True, True), ("cancel", 1),
                            ("turn", "after", 1, True, True), ("end", 1)]
    assert "partial\n[cancelled]\n" in out and "next" in out


def test_a_full_session_says_to_type_end():
    client = FakeClient([delta("", 0, "length")])
    out = chat(client, "more\n\n")[1]
    assert "Session 1 is full: type `end` to start a new one." in out


def test_errors_and_lost_connections_are_one_line_and_the_chat_goes_on():
    busy = {"error": {"message": "Session 1 is busy.", "code": 409}, "object": "error", "code": 409}
    failed = {**delta("", 1, "error"), "error": "The engine failed this turn."}
    client = FakeClient([busy], [httpx.ConnectError("Connection refused")], [delta("x", 1), failed],
                        [delta("ok", 1, "stop")])
    status, out = chat(client, "a\n\nb\n\nc\n\nd\n\n")
    assert status == 0 and "ok" in out
    assert "error: Session 1 is busy.\n" in out and "x\nerror: The engine failed this turn.\n" in out
    assert "error: cannot reach http://fake: Connection refused\n" in out
    assert "Traceback" not in out


def test_without_a_session_id_the_chat_asks_the_server_for_one():
    client = FakeClient([delta("ok", 1, "stop")])
    status, out = chat(client, "hi\n\n", session_id=None)
    assert status == 0 and f"Session {2**52 + 7} with" in out
    assert client.calls == [("new",), ("turn", "hi", 2**52 + 7, True, True), ("end", 2**52 + 7)]


@pytest.mark.parametrize("error, shown", [
    (ErrorReply("Too many sessions.", {"code": 429}), "error: cannot open a session: Too many sessions.\n"),
    (httpx.ConnectError("Connection refused"), "error: cannot reach http://fake: Connection refused\n"),
])
def test_a_session_the_server_will_not_open_exits_1_in_one_line(error, shown):
    client = FakeClient()
    client.new_session_reply = error
    status, out = chat(client, "hi\n\n", session_id=None)
    assert status == 1 and out.endswith(shown) and client.calls == [("new",)]


def test_exit_fails_when_the_session_cannot_be_ended():
    status, out = chat(FakeClient(end_reply=httpx.ConnectError("Connection refused")), "exit\n\n")
    assert status == 1 and "cannot reach" in out


# The command itself, against a live server: a context long enough for several 512-token replies.


@pytest.fixture(scope="module")
def server(long_model_dir):
    server = LiveServer(long_model_dir, "--model-name", "tiny")
    yield server
    server.stop()


class Terminal:
    """``lmserve serve api_client`` in a subprocess, typed into through its stdin."""

    def __init__(self, *args: str):
        self.process = subprocess.Popen([*LMSERVE, "serve", "api_client", *args], stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.output = b""

    def type(self, text: str) -> None:
        self.process.stdin.write(text.encode())
        self.process.stdin.flush()

    def read_until(self, marker: str, timeout: float = 60) -> str:
        """The output from the start up to the first ``marker`` after what was read before."""
        start = len(self.output)
        deadline = time.monotonic() + timeout
        while marker.encode() not in self.output[start:]:
            remaining = deadline - time.monotonic()
            assert remaining > 0, f"{marker!r} not printed in {timeout} s: {self.output.decode(errors='replace')}"
            if select.select([self.process.stdout], [], [], remaining)[0]:
                chunk = os.read(self.process.stdout.fileno(), 65536)
                assert chunk, f"the chat exited: {self.output.decode(errors='replace')}"
                self.output += chunk
        return self.output[start:].decode(errors="replace")

    def close(self) -> int:
        self.process.stdin.close()
        status = self.process.wait(timeout=60)
        self.output += self.process.stdout.read()
        return status


def history_tokens(api_client: APIClient, session_id: int, keep: bool) -> int:
    """The session's history on the server, as a one-token turn reports it (``keep``: the turn stays in it)."""
    reply = next(api_client.chat_interactive_v1("?", session_id=session_id, interactive_mode=keep,
                                                request_output_len=1))
    assert reply["finish_reason"] is not None, reply
    return reply["history_tokens"]


def test_the_command_chats_end_drops_the_history_and_exit_ends_the_session(server):
    terminal = Terminal(server.base_url, "--session-id", "21")
    try:
        assert "Session 21" in terminal.read_until(PROMPT)
        terminal.type("Hello\nthere\n\n")
        assert terminal.read_until(PROMPT).strip(), "the reply is printed"
        with APIClient(server.base_url) as api_client:
            assert history_tokens(api_client, 21, keep=True) > 0, "the chat's turn is kept on the server"
            terminal.type("end\n\n")
            assert "Session 21 ended" in terminal.read_until(PROMPT)
            assert history_tokens(api_client, 21, keep=False) == 0
            terminal.type("Hello again\n\n")
            terminal.read_until(PROMPT)
            terminal.type("exit\n\n")
            assert terminal.close() == 0
            assert history_tokens(api_client, 21, keep=False) == 0
    finally:
        terminal.process.kill()


def test_the_command_without_a_session_id_chats_in_a_session_the_server_made(server):
    terminal = Terminal(server.base_url)
    try:
        greeting = terminal.read_until(PROMPT)
        session_id = int(re.search(r"Session (\d+) with", greeting).group(1))
        assert 2**20 < session_id < 2**53, "an id nobody would guess"
        terminal.type("Hello\n\n")
        terminal.read_until(PROMPT)
        with APIClient(server.base_url) as api_client:
            assert history_tokens(api_client, session_id, keep=True) > 0, "the chat's turn is kept under that id"
            terminal.type("exit\n\n")
            assert terminal.close() == 0
            assert history_tokens(api_client, session_id, keep=False) == 0
    finally:
        terminal.process.kill()


def test_a_full_session_says_to_type_end_and_end_makes_room(tiny_server):
    """The tiny server's context is 256 tokens; a turn given all the room left fills it."""
    with APIClient(tiny_server.base_url) as api_client:
        filled = next(api_client.chat_interactive_v1("fill", session_id=23, interactive_mode=True, ignore_eos=True))
    assert filled["finish_reason"] == "length" and filled["tokens"] > 0
    terminal = Terminal(tiny_server.base_url, "--session-id", "23")
    try:
        terminal.read_until(PROMPT)
        terminal.type("more\n\n")
        assert "Session 23 is full: type `end` to start a new one." in terminal.read_until(PROMPT)
        terminal.type("end\n\n")
        assert "Session 23 ended" in terminal.read_until(PROMPT)
        terminal.type("more\n\n")
        assert "is full" not in terminal.read_until(PROMPT)
        terminal.type("exit\n\n")
        assert terminal.close() == 0
    finally:
        terminal.process.kill()


def test_an_unreachable_server_exits_1_with_one_line():
    url = f"http://127.0.0.1:{free_port()}"
    result = subprocess.run([*LMSERVE, "serve", "api_client", url], input=b"hi\n\n", capture_output=True, timeout=60)
    assert result.returncode == 1
    assert result.stderr.decode().strip() == (f"lmserve: error: {url}/v1/models did not list the served models: "
                                              "is the server running there, and the API key right?")


@pytest.mark.parametrize("argv, message", [
    (["serve", "api_client", "http://127.0.0.1:1", "--session-id", "-1"], "--session-id must be >= 0"),
    (["serve", "api_server", "/nonexistent/model", "--session-ttl", "-1"], "--session-ttl must be >= 0"),
    (["serve", "api_server", "/nonexistent/model", "--session-ttl", "nan"], "--session-ttl must be >= 0"),
])
def test_bad_session_flags_exit_2(argv, message, capsys):
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_the_api_key_comes_from_the_environment_too(monkeypatch):
    """$LMSERVE_API_KEY keeps the key out of the process list, as $LMSERVE_API_KEYS does the server's."""
    monkeypatch.setenv("LMSERVE_API_KEY", "from-env")
    parser = build_parser(create_plugin_manager(load_entry_points=False))
    assert parser.parse_args(["serve", "api_client", "http://server"]).api_key == "from-env"
    assert parser.parse_args(["serve", "api_client", "http://server", "--api-key", "flag"]).api_key == "flag"
