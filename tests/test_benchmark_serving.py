"""loadtests/benchmark_serving.py against a live server: every request runs to its
max_tokens (the tiny model's end tokens are banned), and the figures it writes add up."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from conftest import LiveServer

LOADTESTS = Path(__file__).resolve().parent.parent / "loadtests"


@pytest.fixture(scope="module")
def benchmark_serving(monkeypatch_module):
    monkeypatch_module.syspath_prepend(str(LOADTESTS))
    import benchmark_serving

    yield benchmark_serving
    sys.modules.pop("benchmark_serving", None)
    sys.modules.pop("workload", None)


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as patch:
        yield patch


@pytest.fixture(scope="module")
def server(long_model_dir, tmp_path_factory):
    """The tiny model with room for the workload's prompts (byte-level tokens: ~700 for the longest)."""
    server = LiveServer(long_model_dir, "--model-name", "tiny", "--cache-max-entry-count", "512",
                        log_dir=tmp_path_factory.mktemp("benchmark-server"))
    yield server
    server.stop()


def end_token_ids(model_dir: Path) -> list[str]:
    """The ids that can end the tiny model's text, as its files name them: BOS and EOS in
    config.json (<|endoftext|>, <|im_end|>) and generation_config.json's EOS."""
    config = json.loads((model_dir / "config.json").read_text())
    generation = json.loads((model_dir / "generation_config.json").read_text())
    return [str(i) for i in {config["bos_token_id"], config["eos_token_id"], generation["eos_token_id"]}]


def test_each_request_produces_exactly_its_max_tokens(benchmark_serving, server, long_model_dir, tmp_path, capsys):
    out = tmp_path / "figures.json"
    assert benchmark_serving.main(["--url", server.base_url, "--concurrency", "1", "3", "--max-tokens", "6",
                                   "--long-prompt-tokens", "40", "--repeats", "1", "--json", str(out),
                                   "--ban-token-ids", *end_token_ids(long_model_dir)]) == 0
    figures = json.loads(out.read_text())
    assert figures["model"] == "tiny"
    assert [level["concurrency"] for level in figures["levels"]] == [1, 3]
    for level in figures["levels"]:
        assert level["tokens"] == level["requested_tokens"] > 0
        assert level["tokens_per_s"] == pytest.approx(level["tokens"] / level["seconds"])
    assert figures["levels"][0]["requested_tokens"] == 6  # one request asks for all of --max-tokens
    assert figures["long_prompt_tokens"] > 20 and figures["long_prompt_ttft_s"] > 0
    assert "| 3 |" in capsys.readouterr().out


def test_a_refused_request_stops_the_benchmark(benchmark_serving, server):
    with pytest.raises(RuntimeError, match="404"):
        benchmark_serving.main(["--url", server.base_url, "--model", "no-such-model", "--concurrency", "1"])


def test_random_conversations_at_request_rates_against_two_servers(benchmark_serving, server, long_model_dir,
                                                                    tmp_path, capsys):
    import csv

    out, table, chart = tmp_path / "figures.json", tmp_path / "figures.csv", tmp_path / "figures.png"
    assert benchmark_serving.main([
        "--url", f"first={server.base_url}", f"second={server.base_url}", "--dataset", "random",
        "--random-input-len", "20", "--random-output-len", "4", "--turns", "2", "--request-rate", "20", "inf",
        "--num-prompts", "3", "--seed", "1", "--json", str(out), "--csv", str(table), "--png", str(chart),
        "--ban-token-ids", *end_token_ids(long_model_dir)]) == 0
    figures = json.loads(out.read_text())
    assert figures["label"] == "first" and [peer["label"] for peer in figures["peers"]] == ["second"]
    for level in figures["levels"] + figures["peers"][0]["levels"]:
        assert level["requests"] == 6  # 3 conversations of 2 turns
        assert level["tokens"] == level["requested_tokens"] > 0
        assert 0 < level["ttft_s"]["p50"] <= level["ttft_s"]["p99"] <= level["e2e_s"]["p99"]
        assert level["tpot_s"]["p50"] > 0 and level["itl_s"]["p50"] > 0
    # The same seeded workload for both servers.
    assert [lv["requested_tokens"] for lv in figures["levels"]] == \
        [lv["requested_tokens"] for lv in figures["peers"][0]["levels"]]
    with open(table) as rows:
        assert [(row["server"], row["request_rate"]) for row in csv.DictReader(rows)] == [
            ("first", "20.0"), ("first", "inf"), ("second", "20.0"), ("second", "inf")]
    assert chart.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "second / first" in capsys.readouterr().out
