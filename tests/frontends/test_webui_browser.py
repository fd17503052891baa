"""``lmserve serve gradio URL`` in headless Chromium: type, watch the reply stream in, Cancel, Reset.

The browser is the system's headless Chromium (tests/headless_browser.py). The screenshots
go to ``test-artifacts/`` at the repository's root (``$LMSERVE_TEST_ARTIFACTS`` elsewhere).
"""

from __future__ import annotations

import re
import subprocess
import time

import httpx
import pytest

from conftest import LMSERVE, free_port
from lmserve.frontends.api_client import APIClient

pytest.importorskip("gradio", reason="the web UI is an extra: pip install 'lmserve[webui]'")
from headless_browser import artifacts_dir, start_chromium  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

pytestmark = pytest.mark.real_model  # the page chats with SmolLM2: a readable reply, long enough to watch

PROMPT = "Tell me a long story about a dragon who learns to fly."


@pytest.fixture(scope="module")
def page_url(smollm2_server, tmp_path_factory):
    """The page, over the real model's server."""
    port = free_port()
    log_path = tmp_path_factory.mktemp("webui") / "webui.log"
    with open(log_path, "w") as log:
        process = subprocess.Popen([*LMSERVE, "serve", "gradio", smollm2_server.base_url, "--server-name",
                                    "127.0.0.1", "--server-port", str(port)], stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert process.poll() is None, f"the page exited: {log_path.read_text()}"
            assert time.monotonic() < deadline, f"the page did not answer in 120 s: {log_path.read_text()}"
            try:
                if httpx.get(url, timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=30)


@pytest.fixture(scope="module")
def browser():
    driver = start_chromium()
    yield driver
    driver.quit()


def reply_text(browser) -> str:
    """The last assistant message shown ('' when there is none)."""
    messages = browser.find_elements(By.CSS_SELECTOR, "#chat [data-testid='bot']")
    return messages[-1].text if messages else ""


def text_of(browser, element_id: str) -> str:
    return browser.find_element(By.ID, element_id).text.strip()


def history_tokens(server, session_id: int, keep: bool) -> int:
    """The session's history on the server, as a turn of no tokens reports it (``keep``: the session stays)."""
    with APIClient(server.base_url) as api_client:
        reply = next(api_client.chat_interactive_v1("?", session_id=session_id, interactive_mode=keep,
                                                    request_output_len=0))
    return reply["history_tokens"]


def set_number(browser, slider_id: str, value: int) -> None:
    """Type ``value`` into a slider's number box."""
    box = browser.find_element(By.CSS_SELECTOR, f"#{slider_id} input[type='number']")
    box.send_keys(Keys.CONTROL, "a")
    box.send_keys(str(value), Keys.TAB)


def test_a_reply_streams_in_cancel_stops_it_and_reset_ends_the_session(browser, page_url, smollm2_server):
    browser.get(page_url)
    wait = WebDriverWait(browser, 60)
    box = wait.until(lambda b: b.find_element(By.CSS_SELECTOR, "#message textarea"))
    assert "smollm2" in text_of(browser, "model").lower()
    session_label = wait.until(lambda b: re.fullmatch(r"Session (\d+)", text_of(b, "session")))
    session_id = int(session_label.group(1))
    set_number(browser, "max-new-tokens", 2048)  # a reply that would run long if not cancelled

    box.send_keys(PROMPT)
    browser.find_element(By.ID, "send").click()
    seen = []  # the reply's length, polled while it streams
    deadline = time.monotonic() + 60
    while len(set(seen)) < 5:  # five different lengths: it grew four times, in the page, as it streamed
        assert time.monotonic() < deadline, f"the reply did not stream in: lengths {seen}"
        seen.append(len(reply_text(browser)))
        time.sleep(0.1)
    assert seen == sorted(seen) and seen[-1] > 0
    assert PROMPT in browser.find_element(By.ID, "chat").text
    browser.save_screenshot(str(artifacts_dir() / "webui-streaming.png"))

    still_growing = len(reply_text(browser))
    browser.find_element(By.ID, "cancel").click()
    wait.until(lambda b: text_of(b, "status") == "Cancelled.")
    stopped = len(reply_text(browser))
    time.sleep(1.5)
    assert len(reply_text(browser)) == stopped, "the reply grew after Cancel"
    assert still_growing <= stopped < 2048 * 2, "cancelled long before its 2048 tokens"
    kept = history_tokens(smollm2_server, session_id, keep=True)
    assert kept > 0, "the cancelled turn's text stays in the session"
    browser.save_screenshot(str(artifacts_dir() / "webui-cancelled.png"))

    browser.find_element(By.ID, "reset").click()
    wait.until(lambda b: text_of(b, "status") == "New session.")
    assert reply_text(browser) == "" and PROMPT not in browser.find_element(By.ID, "chat").text
    assert history_tokens(smollm2_server, session_id, keep=False) == 0, "Reset ended the session on the server"

    browser.switch_to.new_window("tab")  # another tab, another session
    browser.get(page_url)
    other = WebDriverWait(browser, 60).until(lambda b: re.fullmatch(r"Session (\d+)", text_of(b, "session")))
    assert int(other.group(1)) != session_id
