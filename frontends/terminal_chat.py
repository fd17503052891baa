"""``lmserve serve api_client URL``: chat in the terminal, one interactive session on the server.

LMDeploy's terminal client, kept as its users know it: the lines typed up to an
empty one make one prompt; ``end`` ends the session (its history is dropped on
the server) and the next prompt starts a fresh one under the same id; ``exit``
or the end of the input ends it and quits. Unlike LMDeploy's, Ctrl-C during a
reply cancels that turn on the server and returns to the prompt, and a server
that cannot be reached is one line, not a traceback. Without ``--session-id`` the
session's id is one nobody else can guess (:meth:`APIClient.new_session`), so two
people chatting with one server never share a conversation. A thinking model's
reasoning (a server with a reasoning parser sends it apart, as ``reasoning_content``)
is shown between ``[thinking]`` and ``[/thinking]`` lines before the answer.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, TextIO

import httpx

from lmserve.frontends.api_client import APIClient, ErrorReply, error_message, is_session_full, unreachable

PROMPT = "\ndouble enter to end input >>> "
#: What frames a reply's reasoning.
THINKING_OPENS, THINKING_CLOSES = "[thinking]\n", "\n[/thinking]\n"
#: The most tokens of one reply, as LMDeploy's terminal client asks.
REPLY_TOKENS = 512


def chat_in_terminal(api_client: APIClient, session_id: int | None, stdin: TextIO, stdout: TextIO,
                     where: str | None = None, generation: Mapping[str, Any] | None = None) -> int:
    """Chat until ``exit`` or the end of ``stdin``; the exit status (1 when the session could not be
    opened or ended).

    ``session_id``: the session to chat in; None: a new one, its id from the server.
    ``where``: what the greeting names as the other side (default: the server's URL).
    ``generation``: arguments of every turn's request (``temperature``, ``top_p``, ``top_k``,
    ``repetition_penalty``, ``request_output_len``); the rest are the client's defaults.
    """
    generation = {"request_output_len": REPLY_TOKENS, **(generation or {})}
    if session_id is None:
        try:
            session_id = api_client.new_session()
        except ErrorReply as exc:
            stdout.write(f"error: cannot open a session: {exc}\n")
            return 1
        except httpx.TransportError as exc:
            _say_unreachable(api_client, exc, stdout)
            return 1
    stdout.write(f"Session {session_id} with {where or api_client.api_server_url}. An empty line sends what you typed; "
                 "`end` starts a new session, `exit` (or Ctrl-D) quits.\n")
    while True:
        try:
            prompt = read_prompt(stdin, stdout)
        except KeyboardInterrupt:
            stdout.write("\n")  # what was typed is dropped; a fresh prompt follows
            continue
        if prompt is None or prompt.strip() == "exit":
            if prompt is None:
                stdout.write("\n")  # the shell's prompt starts on a line of its own
            return 0 if _end_session(api_client, session_id, stdout) else 1
        if prompt.strip() == "end":
            if _end_session(api_client, session_id, stdout):
                stdout.write(f"Session {session_id} ended; the next prompt starts a new one.\n")
        elif prompt:
            _reply(api_client, session_id, prompt, stdout, generation)


def read_prompt(stdin: TextIO, stdout: TextIO) -> str | None:
    """The lines typed up to an empty one, joined; None at the end of the input with nothing typed."""
    stdout.write(PROMPT)
    stdout.flush()
    lines = []
    while True:
        line = stdin.readline()
        if not line:  # the end of the input
            return "\n".join(lines) if lines else None
        line = line.rstrip("\r\n")
        if not line:
            return "\n".join(lines)
        lines.append(line)


def _reply(api_client: APIClient, session_id: int, prompt: str, stdout: TextIO,
           generation: Mapping[str, Any]) -> None:
    """Print the reply to ``prompt`` as it streams in; Ctrl-C cancels the turn on the server."""
    outputs = api_client.chat_interactive_v1(prompt, session_id=session_id, interactive_mode=True, stream=True,
                                             **generation)
    thinking = False  # inside a thinking model's reasoning (the server's reasoning_content)
    try:
        for output in outputs:
            message = error_message(output)
            if message is not None:
                stdout.write(f"\nerror: {message}\n")
                return
            if output.get("reasoning_content"):
                stdout.write(("" if thinking else THINKING_OPENS) + output["reasoning_content"])
                thinking = True
            if output["text"] and thinking:
                stdout.write(THINKING_CLOSES)
                thinking = False
            stdout.write(output["text"])
            stdout.flush()
            if is_session_full(output):
                stdout.write(f"\nSession {session_id} is full: type `end` to start a new one.")
        stdout.write("\n")
    except KeyboardInterrupt:
        outputs.close()  # stop reading before asking the server to stop
        stdout.write("\n[cancelled]\n")
        _send(lambda: api_client.cancel(session_id), api_client, stdout)
    except httpx.TransportError as exc:
        _say_unreachable(api_client, exc, stdout)
    finally:
        outputs.close()


def _end_session(api_client: APIClient, session_id: int, stdout: TextIO) -> bool:
    """End the session on the server; whether it ended."""
    return _send(lambda: api_client.end_session(session_id), api_client, stdout)


def _send(request, api_client: APIClient, stdout: TextIO) -> bool:
    """Send a one-body request; whether it succeeded (a failure is printed in one line)."""
    try:
        message = error_message(request())
    except httpx.TransportError as exc:
        _say_unreachable(api_client, exc, stdout)
        return False
    if message is not None:
        stdout.write(f"error: {message}\n")
    return message is None


def _say_unreachable(api_client: APIClient, exc: httpx.TransportError, stdout: TextIO) -> None:
    stdout.write(f"\nerror: {unreachable(api_client, exc)}\n")
