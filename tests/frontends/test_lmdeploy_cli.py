"""LMDeploy's command lines run as lmserve command lines: every flag of LMDeploy 0.16's
``serve api_server`` and ``chat`` (and 0.9.2's ``serve gradio``) parses, and then is
lmserve's own setting, a start-up notice, or a refusal (exit 2) that says why; never
argparse's "unrecognized arguments".

The flag lists below are facts copied from LMDeploy's source (0.16's
``lmdeploy/cli/serve.py`` ``add_parser_api_server``, ``lmdeploy/cli/cli.py``
``add_parser_chat`` and every ``ArgumentHelper`` method they call, ``add_spec_group``
included), each with a sample value in LMDeploy's syntax.
"""

import argparse
import ast
import logging
import re

import pytest

from lmserve.core.plugins import create_plugin_manager
from lmserve.core.types import GenerationOutput, GenerationRequest, SamplingParams, TokenUsage
from lmserve.frontends.cli import build_parser, main
from lmserve.frontends.http.http_config import HTTPConfig
from lmserve.frontends.http.request_log import RequestLog
from lmserve.frontends.lmdeploy_flags import (
    ALIAS, API_SERVER, CHAT, CHAT_FLAGS, GRADIO, LMDEPLOY_FLAGS, SAME, lmdeploy_notices,
)

NOTICE, REFUSED = "notice", "refused"


def ours(dest, value):
    return ("ours", dest, value)


#: LMDeploy 0.16 ``serve api_server``: every flag, in its parser's order, a sample value,
#: and what lmserve makes of it.
API_SERVER_FLAGS = [
    ("--server-name", ["127.0.0.1"], ours("server_name", "127.0.0.1")),
    ("--server-port", ["8000"], ours("server_port", 8000)),
    ("--allow-origins", ["https://a.example", "https://b.example"],
     ours("allow_origins", ["https://a.example", "https://b.example"])),
    ("--allow-credentials", [], ours("allow_credentials", True)),
    ("--allow-methods", ["GET", "POST"], ours("allow_methods", ["GET", "POST"])),
    ("--allow-headers", ["x-a"], ours("allow_headers", ["x-a"])),
    ("--proxy-url", ["http://10.0.0.1:8000"], REFUSED),
    ("--max-concurrent-requests", ["4"], ours("max_concurrent_requests", 4)),
    ("--allowed-media-domains", ["example.com"], NOTICE),
    ("--backend", ["turbomind"], NOTICE),
    ("--log-level", ["INFO"], ours("log_level", "INFO")),
    ("--api-keys", ["k1", "k2"], ours("api_keys", ["k1", "k2"])),
    ("--ssl", [], REFUSED),
    ("--model-name", ["served"], ours("model_name", "served")),
    ("--max-log-len", ["100"], ours("max_log_len", 100)),
    ("--disable-fastapi-docs", [], ours("disable_docs", True)),
    ("--allow-terminate-by-client", [], NOTICE),
    ("--enable-abort-handling", [], NOTICE),
    ("--trust-remote-code", [], NOTICE),
    ("--chat-template", ["chatml"], ours("chat_template", "chatml")),
    ("--tool-call-parser", ["qwen"], ours("tool_call_parser", "qwen")),
    ("--reasoning-parser", ["qwen-qwq"], ours("reasoning_parser", "qwen-qwq")),
    ("--revision", ["v1.0"], REFUSED),
    ("--download-dir", ["/data/hub"], NOTICE),
    ("--generation-config", ["lmdeploy"], ours("generation_config", "lmdeploy")),
    ("--adapters", ["a=/lora/a", "b=/lora/b"], REFUSED),
    ("--device", ["cuda"], ours("device", "cuda")),
    ("--eager-mode", [], ours("enforce_eager", True)),
    ("--logprobs-mode", ["raw_logits"], NOTICE),
    ("--dllm-block-length", ["4"], NOTICE),
    ("--dllm-unmasking-strategy", ["sequential"], NOTICE),
    ("--dllm-denoising-steps", ["8"], NOTICE),
    ("--dllm-confidence-threshold", ["0.9"], NOTICE),
    ("--enable-return-routed-experts", [], NOTICE),
    ("--distributed-executor-backend", ["ray"], NOTICE),
    ("--kernel-block-size", ["16"], NOTICE),
    ("--prefix-cache-state-budget", ["4"], NOTICE),
    ("--prefix-cache-decode-state-interval", ["64"], NOTICE),
    ("--language-model-only", [], NOTICE),
    ("--dtype", ["bfloat16"], ours("dtype", "bfloat16")),
    ("--tp", ["2"], ours("tp", 2)),
    ("--session-len", ["4096"], ours("session_len", 4096)),
    ("--max-batch-size", ["32"], ours("max_batch_size", 32)),
    ("--cache-max-entry-count", ["0.5"], ours("cache_max_entry_count", 0.5)),
    ("--cache-block-seq-len", ["32"], ours("cache_block_seq_len", 32)),
    ("--enable-prefix-caching", [], ours("enable_prefix_caching", True)),
    ("--max-prefill-token-num", ["2048"], ours("max_prefill_token_num", 2048)),
    ("--quant-policy", ["8"], REFUSED),
    ("--model-format", ["awq"], REFUSED),
    ("--hf-overrides", ['{"rope_scaling": {"factor": 2.0}}'], REFUSED),
    ("--disable-metrics", [], NOTICE),
    ("--dp", ["2"], REFUSED),
    ("--ep", ["2"], NOTICE),
    ("--enable-microbatch", [], NOTICE),
    ("--enable-eplb", [], NOTICE),
    ("--role", ["Prefill"], REFUSED),
    ("--migration-backend", ["Mooncake"], NOTICE),
    ("--cudagraph-capture-batch-sizes", ["1", "2", "4"], NOTICE),
    ("--node-rank", ["1"], ours("node_rank", 1)),
    ("--nnodes", ["2"], ours("nnodes", 2)),
    ("--cp", ["2"], NOTICE),
    ("--rope-scaling-factor", ["2.0"], REFUSED),
    ("--num-tokens-per-iter", ["512"], NOTICE),
    ("--max-prefill-iters", ["2"], NOTICE),
    ("--async", ["0"], NOTICE),
    ("--communicator", ["cuda-ipc"], NOTICE),
    ("--dist-init-addr", ["10.0.0.1:29500"], NOTICE),
    ("--vision-max-batch-size", ["4"], NOTICE),
    ("--speculative-algorithm", ["eagle3"], REFUSED),
    ("--speculative-draft-model", ["/models/draft"], NOTICE),
    ("--speculative-num-draft-tokens", ["3"], NOTICE),
]
SAMPLES = {flag: (values, outcome) for flag, values, outcome in API_SERVER_FLAGS}

#: LMDeploy 0.16 ``chat``'s flags (all of them are api_server's too).
LMDEPLOY_CHAT_FLAGS = [
    "--backend", "--chat-template", "--revision", "--download-dir", "--trust-remote-code", "--adapters",
    "--device", "--eager-mode", "--dllm-block-length", "--prefix-cache-state-budget",
    "--prefix-cache-decode-state-interval", "--dtype", "--tp", "--session-len", "--cache-max-entry-count",
    "--enable-prefix-caching", "--quant-policy", "--language-model-only", "--model-format",
    "--rope-scaling-factor", "--communicator", "--cp", "--async", "--speculative-algorithm",
    "--speculative-draft-model", "--speculative-num-draft-tokens",
]
#: LMDeploy 0.9.2 ``serve gradio``'s flags: a page over a running server here, so the model's
#: and engine's are notices.
LMDEPLOY_GRADIO_FLAGS = [
    "--share", "--backend", "--max-log-len", "--revision", "--download-dir", "--chat-template", "--device",
    "--eager-mode", "--dtype", "--tp", "--session-len", "--max-batch-size", "--cache-max-entry-count",
    "--cache-block-seq-len", "--enable-prefix-caching", "--max-prefill-token-num", "--model-format",
    "--quant-policy", "--rope-scaling-factor", "--communicator",
]


@pytest.fixture(scope="module")
def parser():
    return build_parser(create_plugin_manager(load_entry_points=False))


def outcome_of(args: argparse.Namespace, command: str):
    """``(notices, refusal)`` of a parsed command line."""
    try:
        return lmdeploy_notices(args, command), None
    except ValueError as exc:
        return None, str(exc)


def test_the_table_lists_every_flag_of_lmdeploy_0_16_and_no_other():
    assert [entry.flag for entry in LMDEPLOY_FLAGS] == [flag for flag, _, _ in API_SERVER_FLAGS]
    assert CHAT_FLAGS == set(LMDEPLOY_CHAT_FLAGS)


@pytest.mark.parametrize("flag, values, expected", API_SERVER_FLAGS, ids=[flag for flag, _, _ in API_SERVER_FLAGS])
def test_every_api_server_flag_parses_and_is_a_setting_a_notice_or_a_refusal(parser, flag, values, expected):
    args = parser.parse_args(["serve", "api_server", "some/model", flag, *values])
    notices, refusal = outcome_of(args, API_SERVER)
    if expected == NOTICE:
        assert refusal is None and len(notices) == 1
        assert notices[0].startswith(f"{flag}{''.join(' ' + value for value in values)}: "), notices
    elif expected == REFUSED:
        assert notices is None and refusal.startswith(f"{flag}"), refusal
        assert len(refusal.split(": ", 1)[1]) > 20  # it says why
    else:
        _, dest, value = expected
        assert (notices, refusal) == ([], None)
        assert vars(args)[dest] == value


@pytest.mark.parametrize("flag", LMDEPLOY_CHAT_FLAGS)
def test_every_chat_flag_parses_as_the_api_servers_does(parser, flag):
    values, expected = SAMPLES[flag]
    args = parser.parse_args(["chat", "some/model", flag, *values])
    notices, refusal = outcome_of(args, CHAT)
    if expected == NOTICE:
        assert len(notices) == 1 and notices[0].startswith(flag)
    elif expected == REFUSED:
        assert refusal.startswith(flag)
    else:
        assert (notices, refusal) == ([], None) and vars(args)[expected[1]] == expected[2]


def test_gradio_takes_its_old_flags_and_says_the_page_needs_a_running_server(parser):
    argv = ["serve", "gradio", "http://127.0.0.1:23333", "--server-name", "127.0.0.1", "--server-port", "6007"]
    for flag in LMDEPLOY_GRADIO_FLAGS:
        argv += [flag, *SAMPLES.get(flag, ([], None))[0]]
    args = parser.parse_args(argv)
    notices = lmdeploy_notices(args, GRADIO)
    assert (args.server_name, args.server_port) == ("127.0.0.1", 6007)
    noticed = {line.split(" ", 1)[0].rstrip(":"): line for line in notices}
    assert len(notices) == len(noticed) and set(noticed) == set(LMDEPLOY_GRADIO_FLAGS)
    assert noticed["--share"].startswith("--share: there is no public gradio link")
    assert all("running server" in line for flag, line in noticed.items() if flag != "--share"), notices


def test_api_client_takes_lmdeploys_two_flags(parser):
    args = parser.parse_args(["serve", "api_client", "http://127.0.0.1:23333", "--api-key", "k", "--session-id", "3"])
    assert (args.api_key, args.session_id) == ("k", 3)


def test_same_and_alias_rows_are_lmserves_own_flags(parser):
    api_server = parser._subparsers._group_actions[0].choices["serve"]._subparsers._group_actions[0].choices["api_server"]
    for entry in LMDEPLOY_FLAGS:
        action = api_server._option_string_actions[entry.flag]
        if entry.kind in (SAME, ALIAS):
            assert not action.dest.startswith("lmdeploy_"), entry.flag
        if entry.kind == ALIAS:
            assert entry.ours in action.option_strings, entry.flag


@pytest.mark.parametrize("argv", [
    ["--backend", "pytorch"], ["--quant-policy", "0"], ["--quant-policy", "none"], ["--dp", "1"], ["--ep", "1"],
    ["--role", "Hybrid"], ["--model-format", "hf"], ["--adapters"], ["--revision", "main"],
    ["--logprobs-mode", "raw_logprobs"], ["--speculative-num-draft-tokens", "1"], ["--async", "1"],
])
def test_a_flag_given_its_lmdeploy_default_passes_silently(parser, argv):
    assert lmdeploy_notices(parser.parse_args(["serve", "api_server", "m", *argv]), API_SERVER) == []


@pytest.mark.parametrize("argv, message", [
    (["--quant-policy", "int8"], "--quant-policy 8: KV-cache quantization is not supported yet"),
    (["--quant-policy", "fp8_e5m2"], "--quant-policy 17: KV-cache quantization"),
    (["--adapters", "/lora/one"], "--adapters /lora/one: LoRA adapters are not supported yet"),
    (["--model-format", "gptq"], "--quantization int4"),
    (["--dp", "2"], "lmserve serve ray"),
    (["--revision", "abc123"], "give the snapshot's directory as MODEL"),
])
def test_refusals_say_why_and_name_what_to_do_instead(parser, argv, message):
    _, refusal = outcome_of(parser.parse_args(["serve", "api_server", "m", *argv]), API_SERVER)
    assert message in refusal


def test_a_bad_value_is_refused_as_lmdeploy_refuses_it(parser, capsys):
    for argv in (["--quant-policy", "3"], ["--hf-overrides", "{nope"], ["--backend", "vllm"]):
        with pytest.raises(SystemExit) as exit_:
            parser.parse_args(["serve", "api_server", "m", *argv])
        assert exit_.value.code == 2
        assert "invalid" in capsys.readouterr().err


def test_underscored_flags_and_lmdeploys_log_level_names_parse(parser):
    args = parser.parse_args(["serve", "api_server", "m", "--session_len", "8192", "--cache_max_entry_count=0.4",
                              "--log-level", "WARN", "--max_log_len", "7"])
    assert (args.session_len, args.cache_max_entry_count, args.log_level, args.max_log_len) == (8192, 0.4, "WARNING", 7)
    assert parser.parse_args(["chat", "m", "--log-level", "FATAL"]).log_level == "CRITICAL"


def test_api_keys_given_without_keys_turn_authentication_off(parser, monkeypatch):
    args = parser.parse_args(["serve", "api_server", "m", "--api-keys"])
    assert HTTPConfig.from_options(vars(args)).api_keys == ()


def test_the_command_lines_of_lmdeploys_guides_parse(parser):
    """docs/en/llm/api_server.md, api_server_reasoning.md, and the issue's line."""
    args = parser.parse_args(["serve", "api_server", "internlm/internlm2_5-7b-chat", "--server-port", "23333"])
    assert args.server_port == 23333 and lmdeploy_notices(args, API_SERVER) == []
    args = parser.parse_args(["serve", "api_server", "deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B",
                              "--reasoning-parser", "default"])
    assert args.reasoning_parser == "default" and lmdeploy_notices(args, API_SERVER) == []
    args = parser.parse_args(["serve", "api_server", "MODEL", "--backend", "pytorch", "--eager-mode",
                              "--max-log-len", "100", "--reasoning-parser", "qwen-qwq", "--generation-config", "auto"])
    assert lmdeploy_notices(args, API_SERVER) == []
    assert (args.enforce_eager, args.reasoning_parser, args.generation_config) == (True, "qwen-qwq", "auto")
    assert HTTPConfig.from_options(vars(args)).max_log_len == 100
    # The multi-server script registers each server with LMDeploy's proxy: refused, and why.
    args = parser.parse_args(["serve", "api_server", "InternLM/internlm2-chat-1_8b", "--server-name", "10.0.0.2",
                              "--server-port", "23343", "--tp", "2", "--proxy-url", "http://10.0.0.1:8000",
                              "--backend", "turbomind"])
    _, refusal = outcome_of(args, API_SERVER)
    assert refusal.startswith("--proxy-url http://10.0.0.1:8000: ") and "load balancer" in refusal
    # The FAQ's --session_len.
    assert parser.parse_args(["serve", "api_server", "m", "--session_len", "4096"]).session_len == 4096
    assert HTTPConfig.from_options(vars(parser.parse_args(
        ["serve", "api_server", "m", "--disable-fastapi-docs"]))).disable_docs


def test_a_refusal_exits_2_before_the_model_is_looked_for(tmp_path, capsys):
    missing = str(tmp_path / "no-such-model")
    for argv in (["serve", "api_server", missing, "--quant-policy", "int4"],
                 ["chat", missing, "--speculative-algorithm", "eagle"]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("lmserve: error: --"), err
        assert "no-such-model" not in err  # refused before MODEL was resolved


class _Tokenizer:
    def decode(self, ids):
        return "".join(chr(ord("a") + i % 26) for i in ids)


def test_the_request_log_cuts_prompts_at_max_log_len(caplog):
    request = GenerationRequest(prompt_token_ids=tuple(range(40)), sampling_params=SamplingParams(), request_id="r-1")
    finished = GenerationOutput(request_id="r-1", text="", token_ids=(), usage=TokenUsage(40, 3), finish_reason="stop")
    with caplog.at_level(logging.DEBUG, logger="lmserve.frontends.http.request_log"):
        RequestLog(_Tokenizer(), 10).started(request)
        RequestLog(_Tokenizer(), None).started(request)
        RequestLog(_Tokenizer(), 10).finished(request, finished, 0.25)
    cut, whole, done = (record.getMessage() for record in caplog.records)
    assert "request r-1: input_tokens=40" in cut
    assert "prompt='abcdefghij', prompt_token_ids=[0, 1, 2, 3, 4, 5, 6, 7, 8, 9]" in cut
    assert f"prompt={_Tokenizer().decode(range(40))!r}, prompt_token_ids={list(range(40))}" in whole
    assert done == "request r-1 finished: stop, input_tokens=40, output_tokens=3, 0.250 s"


def test_the_request_log_keeps_prompts_out_at_info(caplog):
    class Exploding:
        def decode(self, ids):
            raise AssertionError("decoded at INFO")

    request = GenerationRequest(prompt_token_ids=(1, 2, 3), sampling_params=SamplingParams(), request_id="r")
    with caplog.at_level(logging.INFO, logger="lmserve.frontends.http.request_log"):
        RequestLog(Exploding(), None).started(request)
    (line,) = (record.getMessage() for record in caplog.records)
    assert line.startswith("request r: input_tokens=3, sampling=")
    assert "prompt=" not in line and "prompt_token_ids" not in line


def test_the_request_log_is_silent_at_warning(caplog):
    class Exploding:
        def decode(self, ids):
            raise AssertionError("decoded at WARNING")

    request = GenerationRequest(prompt_token_ids=(1, 2), sampling_params=SamplingParams(), request_id="r")
    with caplog.at_level(logging.WARNING, logger="lmserve.frontends.http.request_log"):
        RequestLog(Exploding(), None).started(request)
    assert caplog.records == []


def test_the_issues_lmdeploy_line_serves_with_its_notices_once_and_a_cut_request_log(lmserve_server_factory):
    server = lmserve_server_factory("--backend", "pytorch", "--eager-mode", "--max-log-len", "100",
                                    "--reasoning-parser", "qwen-qwq", "--generation-config", "auto",
                                    "--trust-remote-code", "--log-level", "DEBUG", "--model-name", "tiny")
    try:
        with server.client() as client:
            message = "hello " * 30 + "END-OF-PROMPT-MARKER"
            reply = client.post("/v1/chat/completions", json={
                "model": "tiny", "messages": [{"role": "user", "content": message}], "max_tokens": 2})
            assert reply.status_code == 200, reply.text
            assert reply.json()["usage"]["prompt_tokens"] > 100
            assert client.get("/openapi.json").status_code == 200
        log = server.log()
    finally:
        server.stop()
    assert log.count("lmserve: --trust-remote-code: no code of the model's repository runs here") == 1
    assert "--backend" not in log  # pytorch: what lmserve runs anyway
    line = re.search(r"request (\S+): input_tokens=(\d+), sampling=.*, prompt=(['\"].*['\"]), prompt_token_ids=(\[.*\])$",
                     log, re.MULTILINE)
    assert line is not None, log
    assert int(line[2]) > 100
    assert len(ast.literal_eval(line[3])) == 100 and len(ast.literal_eval(line[4])) == 100
    assert "END-OF-PROMPT-MARKER" not in log
    assert re.search(rf"request {re.escape(line[1])} finished: length, input_tokens=\d+, output_tokens=2, ", log)
