"""``lmserve serve gradio URL``: a chat page in the browser over a running api_server.

LMDeploy's gradio front end, for lmserve: each browser tab chats in an
interactive session of its own (``/v1/chat/interactive``), so the server keeps the
conversation and its KV cache and each turn sends only the new message. The reply
streams in; the sliders set each turn's max new tokens, temperature and top_p;
Cancel stops the running turn on the server (what was generated stays), Reset ends
the session (its history is dropped on the server) and clears the page. A tab's
session id is one nobody else can guess (the server makes it: ``POST /v1/sessions``),
so another page on the same server cannot reach its conversation. A closed
tab's session is ended when gradio lets its state go. The server's errors (a turn
while another runs: 409; a full session) show in the page.

gradio is an optional extra (``pip install 'lmserve[webui]'``); the page talks to the
server over HTTP like any client, so it may run on another machine. It loads nothing
from outside: the theme uses the system's fonts.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator

# Before gradio is imported: it would otherwise send usage statistics out.
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import gradio as gr  # noqa: E402
import httpx  # noqa: E402

from lmserve.frontends.api_client import (  # noqa: E402
    APIClient,
    ErrorReply,
    error_message,
    is_session_full,
    no_models_listed,
    random_session_id,
    unreachable,
)

#: The sliders' ranges and starting values (LMDeploy's gradio page's).
MAX_NEW_TOKENS = (1, 2048, 512)
TEMPERATURE = (0.0, 2.0, 0.8)
TOP_P = (0.01, 1.0, 0.8)  # top_p must be above 0
SYSTEM_FONTS = ("ui-sans-serif", "system-ui", "sans-serif")
SYSTEM_MONO_FONTS = ("ui-monospace", "monospace")

Chat = list[dict]  # gradio's chat history: {"role": "user" | "assistant", "content": str} messages


#: The title of the folded message that holds a thinking model's reasoning.
THINKING_TITLE = "Thinking"


def _with_reasoning(chat: Chat, reasoning: str) -> Chat:
    """``chat`` with ``reasoning`` added to the turn's folded "Thinking" message (made before
    the answer's message on the first piece; a server with a reasoning parser sends it apart)."""
    thoughts = chat[-2] if len(chat) >= 2 and chat[-2].get("metadata", {}).get("title") == THINKING_TITLE else None
    if thoughts is None:
        return [*chat[:-1], {"role": "assistant", "content": reasoning, "metadata": {"title": THINKING_TITLE}},
                chat[-1]]
    return [*chat[:-2], {**thoughts, "content": thoughts["content"] + reasoning}, chat[-1]]


class WebChat:
    """What the page's buttons do, over one server; each method gets the tab's session id."""

    def __init__(self, api_client: APIClient) -> None:
        self.api_client = api_client

    def send(self, message: str, chat: Chat, session_id: int, max_new_tokens: int, temperature: float,
             top_p: float) -> Iterator[tuple[Chat, str, str]]:
        """A turn: yields (the chat, the text box, the status line) as the reply streams in."""
        if not message.strip():
            yield chat, message, ""
            return
        before = chat
        chat = [*chat, {"role": "user", "content": message}, {"role": "assistant", "content": ""}]
        yield chat, "", "Generating..."
        status = ""
        outputs = self.api_client.chat_interactive_v1(
            message, session_id=session_id, interactive_mode=True, stream=True,
            request_output_len=int(max_new_tokens), temperature=float(temperature), top_p=float(top_p))
        try:
            for output in outputs:
                error = error_message(output)
                if error is not None:
                    chat = before  # the turn did not happen: the message goes back to the box
                    yield chat, message, f"Error: {error}"
                    return
                if output.get("reasoning_content"):
                    chat = _with_reasoning(chat, output["reasoning_content"])
                chat[-1] = {"role": "assistant", "content": chat[-1]["content"] + output["text"]}
                finish_reason = output.get("finish_reason")
                if is_session_full(output):
                    status = "The session is full: press Reset to start a new one."
                elif finish_reason == "length":
                    status = "The reply reached max new tokens."
                elif finish_reason == "abort":
                    status = "Cancelled."
                elif finish_reason == "error":
                    status = "Error: the server failed this turn."
                yield chat, "", status or "Generating..."
        except httpx.TransportError as exc:
            status = f"Error: {unreachable(self.api_client, exc)}"
        finally:
            outputs.close()
        yield chat, "", status

    def cancel(self, session_id: int) -> str:
        """Stop the tab's running turn on the server; the status line."""
        return self._request(lambda: self.api_client.cancel(session_id), "Cancelled.")

    def reset(self, session_id: int) -> tuple[Chat, str, str]:
        """End the tab's session on the server and clear the page: (the chat, the text box, the status line)."""
        return [], "", self._request(lambda: self.api_client.end_session(session_id), "New session.")

    def open_tab(self) -> tuple[int, str]:
        """A new tab's session id, and its label: an id the server reserved, or (when it
        would not: no such route, too many sessions, unreachable) a random one, whose
        first turn then shows the server's error."""
        try:
            session_id = self.api_client.new_session()
        except (ErrorReply, httpx.TransportError):
            session_id = random_session_id()
        return session_id, f"Session {session_id}"

    def end(self, session_id: int | None) -> None:
        """End a closed tab's session (errors are of no one's interest any more)."""
        if session_id is not None:
            self._request(lambda: self.api_client.end_session(session_id), "")

    def _request(self, request, done: str) -> str:
        try:
            error = error_message(request())
        except httpx.TransportError as exc:
            return f"Error: {unreachable(self.api_client, exc)}"
        return done if error is None else f"Error: {error}"


def build_webui(api_client: APIClient, model_name: str) -> gr.Blocks:
    """The page: a chat, the sliders and the buttons, wired to a :class:`WebChat`."""
    web_chat = WebChat(api_client)
    with gr.Blocks(title=f"lmserve: {model_name}") as page:
        gr.Markdown(f"## lmserve: `{model_name}`\nServed by {api_client.api_server_url}; each tab is a session "
                    "of its own, kept on the server.", elem_id="model")
        session_id = gr.State(None, delete_callback=web_chat.end)  # the tab's, set when it loads
        chatbot = gr.Chatbot(label=model_name, elem_id="chat", height=480)
        message = gr.Textbox(placeholder="Type a message and press Enter", show_label=False, elem_id="message")
        with gr.Row():
            status = gr.Markdown("", elem_id="status")
            session_label = gr.Markdown("", elem_id="session")
        with gr.Row():
            send = gr.Button("Send", variant="primary", elem_id="send")
            cancel = gr.Button("Cancel", elem_id="cancel")
            reset = gr.Button("Reset", elem_id="reset")
        with gr.Row():
            max_new_tokens = gr.Slider(*MAX_NEW_TOKENS[:2], value=MAX_NEW_TOKENS[2], step=1, label="Max new tokens",
                                       elem_id="max-new-tokens")
            temperature = gr.Slider(*TEMPERATURE[:2], value=TEMPERATURE[2], step=0.01, label="Temperature",
                                    elem_id="temperature")
            top_p = gr.Slider(*TOP_P[:2], value=TOP_P[2], step=0.01, label="Top p", elem_id="top-p")
        turn = dict(fn=web_chat.send, inputs=[message, chatbot, session_id, max_new_tokens, temperature, top_p],
                    outputs=[chatbot, message, status], concurrency_limit=None)
        message.submit(**turn)
        send.click(**turn)
        page.load(web_chat.open_tab, outputs=[session_id, session_label], queue=False)
        # Cancel and Reset run beside a streaming turn, not after it.
        cancel.click(web_chat.cancel, inputs=session_id, outputs=status, concurrency_limit=None, queue=False)
        for clear in (reset.click, chatbot.clear):  # the chat's own trash button resets too
            clear(web_chat.reset, inputs=session_id, outputs=[chatbot, message, status], concurrency_limit=None,
                  queue=False)
    return page


def serve_webui(url: str, server_name: str, server_port: int, api_key: str | None = None) -> int:
    """Serve the page until interrupted; the exit status (1 when the api_server cannot be asked)."""
    api_client = APIClient(url, api_key=api_key)
    models = api_client.available_models
    if not models:
        print(f"lmserve: error: {no_models_listed(api_client)}", file=sys.stderr)
        return 1
    page = build_webui(api_client, models[0])
    theme = gr.themes.Default(font=list(SYSTEM_FONTS), font_mono=list(SYSTEM_MONO_FONTS))
    page.queue().launch(server_name=server_name, server_port=server_port, theme=theme, share=False,
                        footer_links=[], ssr_mode=False)
    api_client.close()
    return 0
