"""Which chat template a live server renders with: ``--chat-template`` (a JSON
file, a JSON string), ``--meta-instruction``, a name match for a model without a
Jinja template, ``base`` when nothing matches; the template's stop words of
several tokens stopping chat replies; and ``lmserve templates``.

The prompt a server renders is read back through ``/tokenize`` with
``messages``: the same token ids as the expected text.
"""

import json
import shutil
import subprocess

import pytest

from conftest import LMDEPLOY_DOC_JSON, LMSERVE, LiveServer, free_port, post

HI = [{"role": "user", "content": "Hi!"}]


def chatml(system: str, user: str = "Hi!") -> str:
    return (f"<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n{user}<|im_end|>\n"
            "<|im_start|>assistant\n")


def rendered_ids(server, messages) -> list[int]:
    return post(server, "/tokenize", {"messages": messages})["tokens"]


def text_ids(server, text: str) -> list[int]:
    return post(server, "/tokenize", {"prompt": text, "add_special_tokens": False})["tokens"]


def without_jinja_template(source, directory):
    """A copy of the tiny model whose tokenizer carries no chat template."""
    for file in source.iterdir():
        shutil.copy(file, directory)
    config = json.loads((directory / "tokenizer_config.json").read_text())
    del config["chat_template"]
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    return directory


@pytest.fixture(scope="module")
def file_server(tiny_model_dir, tmp_path_factory):
    path = tmp_path_factory.mktemp("template") / "robot.json"
    path.write_text(json.dumps(LMDEPLOY_DOC_JSON, indent=4))
    server = LiveServer(tiny_model_dir, "--model-name", "tiny", "--chat-template", str(path))
    yield server
    server.stop()


def test_a_json_file_in_lmdeploys_format_renders_the_prompt(file_server):
    assert rendered_ids(file_server, HI) == text_ids(file_server, chatml("You are a robot developed by LMDeploy."))
    assert "chat template 'lmdeploy-robot': --chat-template file" in file_server.log()


def greedy_reply(server, messages, **body) -> dict:
    reply = post(server, "/v1/chat/completions",
                 {"model": "tiny", "messages": messages, "temperature": 0, "max_tokens": 40, **body})
    return reply["choices"][0]


def stop_fragment(text: str) -> str:
    """Four printable ASCII characters of ``text``, not at its start, first found there."""
    for start in range(1, len(text) - 4):
        fragment = text[start:start + 4]
        if all(c.isascii() and c.isprintable() for c in fragment) and text.find(fragment) == start:
            return fragment
    pytest.fail(f"no usable stop word in {text!r}")


PIRATE = "Be a pirate."
PIRATE_MESSAGES = [{"role": "system", "content": PIRATE}, *HI]


@pytest.fixture(scope="module")
def pirate_stop(file_server):
    """A stop word the model writes (greedy) when a pirate is told Hi!, and the reply before it."""
    text = greedy_reply(file_server, PIRATE_MESSAGES, ignore_eos=True)["message"]["content"]
    fragment = stop_fragment(text)
    return fragment, text[:text.find(fragment)]


@pytest.fixture(scope="module")
def string_server(tiny_model_dir, pirate_stop):
    template = {**LMDEPLOY_DOC_JSON, "model_name": "robot-with-a-word", "stop_words": ["<|im_end|>", pirate_stop[0]]}
    server = LiveServer(tiny_model_dir, "--model-name", "tiny", "--chat-template", json.dumps(template),
                        "--meta-instruction", PIRATE)
    yield server
    server.stop()


def test_a_json_string_and_meta_instruction_set_the_system_prompt(string_server):
    assert rendered_ids(string_server, HI) == text_ids(string_server, chatml(PIRATE))
    assert rendered_ids(string_server, PIRATE_MESSAGES[:1] + HI) == rendered_ids(string_server, HI)
    assert "--meta-instruction sets its default system prompt" in string_server.log()


def test_a_stop_word_of_several_tokens_stops_chat_replies(string_server, pirate_stop):
    fragment, before = pirate_stop
    assert len(text_ids(string_server, fragment)) > 1
    choice = greedy_reply(string_server, HI)
    assert (choice["message"]["content"], choice["finish_reason"]) == (before, "stop")
    interactive = post(string_server, "/v1/chat/interactive",
                       {"prompt": "Hi!", "temperature": 0, "request_output_len": 40})
    assert (interactive["text"], interactive["finish_reason"]) == (before, "stop")


def test_ignore_eos_turns_the_stop_words_off(string_server, pirate_stop):
    fragment, before = pirate_stop
    choice = greedy_reply(string_server, HI, ignore_eos=True)
    assert choice["message"]["content"].startswith(before + fragment) and choice["finish_reason"] == "length"


def test_a_completion_does_not_stop_on_the_templates_stop_strings(string_server, pirate_stop):
    fragment, _ = pirate_stop
    prompt = chatml(PIRATE)
    reply = post(string_server, "/v1/completions",
                 {"model": "tiny", "prompt": prompt, "temperature": 0, "max_tokens": 40})
    assert fragment in reply["choices"][0]["text"]


# ----------------------------------------------------------------- choice by the name


@pytest.fixture(scope="module")
def qwen_dir(tiny_model_dir, tmp_path_factory):
    return without_jinja_template(tiny_model_dir, tmp_path_factory.mktemp("Qwen2.5-tiny-Instruct"))


@pytest.fixture(scope="module")
def mystery_dir(tiny_model_dir, tmp_path_factory):
    return without_jinja_template(tiny_model_dir, tmp_path_factory.mktemp("mystery-tiny"))


def test_a_model_without_a_jinja_template_gets_the_template_its_name_matches(qwen_dir):
    server = LiveServer(qwen_dir, "--model-name", "tiny")
    try:
        expected = chatml("You are Qwen, created by Alibaba Cloud. You are a helpful assistant.")
        assert rendered_ids(server, HI) == text_ids(server, expected)
        assert "chat template 'qwen2.5'" in server.log()
    finally:
        server.stop()


def test_a_model_that_matches_nothing_gets_base_with_a_warning(mystery_dir):
    server = LiveServer(mystery_dir, "--model-name", "tiny")
    try:
        assert rendered_ids(server, HI) == text_ids(server, "Hi!")
        log = server.log()
        assert "WARNING" in log and "No chat template found" in log and "chat template 'base'" in log
    finally:
        server.stop()


@pytest.mark.parametrize("value, error", [
    ("no-such-template", "known ones: hf, chatml, vicuna"),
    ('{"model_name": "x", "eoh": 3}', "eoh must be a string"),
    ("{not json", "not valid JSON"),
])
def test_a_bad_chat_template_stops_the_server_with_one_line(tiny_model_dir, value, error):
    result = subprocess.run(
        [*LMSERVE, "serve", "api_server", str(tiny_model_dir), "--server-port", str(free_port()),
         "--chat-template", value], capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 2 and error in result.stderr, result.stderr


# ------------------------------------------------------------------ lmserve templates


def lmserve(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*LMSERVE, *args], capture_output=True, text=True, timeout=120)


def test_templates_lists_the_registry():
    result = lmserve("templates")
    assert result.returncode == 0, result.stderr
    rows = {line.split()[0].rstrip(","): line for line in result.stdout.splitlines()[1:]}
    assert list(rows) == ["hf", "chatml", "vicuna", "internlm2", "llama2", "llama3.1", "llama3", "qwen",
                          "qwen2.5", "mistral", "base"]
    assert "qwen2d5" in rows["qwen2.5"] and "<|im_end|>" in rows["qwen2.5"]
    assert "('qwen2.5' or 'qwen2_5') and not 'vl'" in rows["qwen2.5"]


@pytest.mark.parametrize("model_dir, expected", [
    ("tiny_model_dir", "gets 'hf': the model ships its own Jinja chat template"),
    ("qwen_dir", "gets 'qwen2.5': no Jinja template of its own, and"),
    ("mystery_dir", "gets 'base': no Jinja template of its own and no name match"),
])
def test_templates_says_which_template_a_model_gets_and_why(request, model_dir, expected):
    result = lmserve("templates", str(request.getfixturevalue(model_dir)))
    assert result.returncode == 0, result.stderr
    assert expected in result.stdout


def test_templates_shows_what_a_chat_template_flag_gives(qwen_dir):
    result = lmserve("templates", str(qwen_dir), "--chat-template", json.dumps(LMDEPLOY_DOC_JSON))
    assert "gets 'lmdeploy-robot': --chat-template JSON" in result.stdout
    assert chatml("You are a robot developed by LMDeploy.", "Hello!") in result.stdout


def test_templates_of_an_unknown_model_is_one_line():
    result = lmserve("templates", "no/such-model-anywhere")
    assert result.returncode == 2 and result.stderr.startswith("lmserve: error: Cannot find model")
