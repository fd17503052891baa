"""``lmserve chat MODEL``: a terminal chat with a model loaded in the process, typed into through stdin."""

import os
import re
import select
import signal
import subprocess
import time

import pytest

from conftest import LMSERVE
from lmserve.frontends.api_client import APIClient
from lmserve.frontends.cli import main
from lmserve.frontends.terminal_chat import PROMPT

#: The flags of the tiny test server (float32, float weights, eager) and greedy turns of at most 12 tokens.
EXACT = ["--dtype", "float32", "--quantization", "none", "--enforce-eager"]
GREEDY = ["--temperature", "0", "--max-new-tokens", "12"]


def chat(model, typed: str, *args: str, timeout: float = 180) -> tuple[int, list[str], str]:
    """Run ``lmserve chat MODEL`` on ``typed``: the exit status, what followed each prompt, and stderr."""
    result = subprocess.run([*LMSERVE, "chat", str(model), *args], input=typed.encode(), capture_output=True,
                            timeout=timeout)
    stdout = result.stdout.decode()
    return result.returncode, stdout.split(PROMPT), result.stderr.decode()


def server_turns(server, prompts: list[str], session_id: int) -> list[str]:
    """The server's greedy replies to ``prompts``, as turns of one interactive session."""
    replies = []
    with APIClient(server.base_url) as api_client:
        for prompt in prompts:
            reply = next(api_client.chat_interactive_v1(prompt, session_id=session_id, interactive_mode=True,
                                                        temperature=0, request_output_len=12))
            assert reply["finish_reason"] is not None, reply
            replies.append(reply["text"])
        api_client.end_session(session_id)
    return replies


def test_two_turns_keep_the_history_end_drops_it_and_exit_quits(tiny_model_dir, tiny_server):
    """The chat's turns are the server's interactive turns: the same greedy replies, history included."""
    status, screens, stderr = chat(tiny_model_dir, "Hello there\n\nAnd then?\n\nend\n\nAnd then?\n\nexit\n",
                                   *EXACT, *GREEDY)
    assert status == 0, stderr
    greeting, first, second, ended, fresh, last = screens
    session_id = re.search(r"Session (\d+) with", greeting).group(1)  # one the in-process server made
    assert "`exit`" in greeting
    assert "error" not in "".join(screens)
    with_history = server_turns(tiny_server, ["Hello there", "And then?"], session_id=31)
    assert [first.strip(), second.strip()] == [text.strip() for text in with_history]
    assert ended.strip() == f"Session {session_id} ended; the next prompt starts a new one."
    [alone] = server_turns(tiny_server, ["And then?"], session_id=32)
    assert fresh.strip() == alone.strip()
    assert with_history[1] != alone, "the history changed the second turn's reply"
    assert last == ""  # exit prints nothing after the prompt


def test_ctrl_c_cancels_a_reply_and_the_chat_goes_on(long_model_dir):
    """SIGINT while a reply streams: the turn is cancelled on the in-process server, the prompt comes back."""
    process = subprocess.Popen([*LMSERVE, "chat", str(long_model_dir), *EXACT, "--temperature", "0",
                                "--max-new-tokens", "30000"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # not inherited ignored
    output = b""

    def read_until(marker: bytes, since: int = 0, timeout: float = 120) -> int:
        """Read until ``marker`` shows after ``since``; where it ends."""
        nonlocal output
        deadline = time.monotonic() + timeout
        while marker not in output[since:]:
            assert time.monotonic() < deadline, f"{marker!r} not printed: {output[-500:]!r}"
            if select.select([process.stdout], [], [], 0.2)[0]:
                chunk = os.read(process.stdout.fileno(), 65536)
                assert chunk, f"the chat exited: {output[-500:]!r} {process.stderr.read()!r}"
                output += chunk
        return output.index(marker, since) + len(marker)

    try:
        typed_at = read_until(PROMPT.encode())
        process.stdin.write(b"Go on and on\n\n")
        process.stdin.flush()
        while len(output) - typed_at < 20:  # the reply streams in
            output += os.read(process.stdout.fileno(), 65536)
        process.send_signal(signal.SIGINT)
        cancelled_at = read_until(b"\n[cancelled]\n", since=typed_at, timeout=30)
        read_until(PROMPT.encode(), since=cancelled_at, timeout=30)
        process.stdin.write(b"exit\n")
        process.stdin.close()
        assert process.wait(timeout=60) == 0
    finally:
        process.kill()


def test_the_end_of_the_input_quits_and_the_session_id_is_named(tiny_model_dir):
    status, screens, stderr = chat(tiny_model_dir, "Hi\n", *EXACT, *GREEDY, "--session-id", "9")
    assert status == 0, stderr
    assert "Session 9 with" in screens[0]
    assert screens[1].strip(), "the prompt typed before the end of the input got a reply"


def test_a_bad_sampling_flag_is_one_error_line_per_turn(tiny_model_dir):
    status, screens, _ = chat(tiny_model_dir, "Hi\n\nexit\n", *EXACT, "--temperature", "-1")
    assert status == 0
    assert screens[1].strip().startswith("error:") and "temperature" in screens[1], screens[1]


@pytest.mark.parametrize("argv, message", [
    (["chat", "/nonexistent/model"], "/nonexistent/model"),
    (["chat", "/nonexistent/model", "--session-id", "-1"], "--session-id must be >= 0"),
])
def test_bad_session_ids_and_missing_models_exit_2(argv, message, capsys):
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_api_server_flags_that_apply_are_there_and_checked(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["chat", "/nonexistent/model", "--dtype", "float64"])
    assert exit_info.value.code == 2 and "invalid choice: 'float64'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["chat", "--help"])
    help_text = capsys.readouterr().out
    for flag in ("--session-len", "--chat-template", "--meta-instruction", "--cache-max-entry-count",
                 "--enable-prefix-caching", "--tp", "--temperature", "--max-new-tokens", "--session-id"):
        assert flag in help_text, flag
    assert "--server-port" not in help_text and "--api-keys" not in help_text


@pytest.mark.real_model
def test_the_real_model_answers_two_turns_as_the_server_does(smollm2_gguf, smollm2_server):
    prompts = ["What is the capital of France?", "And of Germany?"]
    status, screens, stderr = chat(smollm2_gguf, "".join(f"{prompt}\n\n" for prompt in prompts) + "exit\n",
                                   *EXACT, *GREEDY, "--session-len", "2048")
    assert status == 0, stderr
    greeting, france, germany, last = screens
    assert "SmolLM2-135M-Instruct" in greeting
    expected = server_turns(smollm2_server, prompts, session_id=33)
    assert [france.strip(), germany.strip()] == [text.strip() for text in expected]
    assert all(text.strip() for text in expected)
