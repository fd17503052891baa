"""The Qwen3 family against HF transformers (tests/family_checks.py): a Qwen3 whose second layer
slides (``use_sliding_window``, ``max_window_layers``) over a window shorter than the long
prompt, a Qwen3 converted to GGUF by llama.cpp's converter, and the Qwen3 split over two ranks."""

from __future__ import annotations

import json

import pytest

from lmserve.backends.torch.factory import EngineConfig, check_parallel
from tests.family_checks import (
    check_http,
    check_engine,
    check_cached_prefixes_and_sessions,
    PROMPTS,
    check_bf16_agreement,
    check_stepwise_logits,
    convert_to_gguf,
    engine_greedy,
    hf_greedy,
    load_hf_model,
    write_family_model,
    write_smollm2_tokenizer,
)

TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, max_position_embeddings=512, rms_norm_eps=1e-6)


@pytest.fixture(scope="module")
def qwen3(tmp_path_factory, smollm2_tokenizer_files):
    """The HF directory (layer 0 attends fully, layer 1 slides over 8), HF's model, its greedy tokens."""
    directory = tmp_path_factory.mktemp("qwen3")
    tokenizer = write_smollm2_tokenizer(directory, smollm2_tokenizer_files)
    write_family_model(directory, "Qwen3Config", tokenizer=tokenizer, use_sliding_window=True, sliding_window=8,
                       max_window_layers=1, **TINY)
    assert json.loads((directory / "config.json").read_text())["layer_types"] == ["full_attention",
                                                                                  "sliding_attention"]
    hf = load_hf_model(directory)
    return directory, hf, [hf_greedy(hf, ids) for ids in PROMPTS]


@pytest.fixture(scope="module")
def qwen3_gguf(tmp_path_factory, smollm2_tokenizer_files):
    directory = tmp_path_factory.mktemp("qwen3-gguf")
    tokenizer = write_smollm2_tokenizer(directory, smollm2_tokenizer_files)
    write_family_model(directory, "Qwen3Config", tokenizer=tokenizer, seed=1, **TINY)
    return convert_to_gguf(directory, directory / "qwen3.gguf"), load_hf_model(directory)


def test_qwen3_with_a_sliding_layer_equals_transformers(qwen3):
    directory, hf, _ = qwen3
    check_stepwise_logits(directory, hf)
    check_bf16_agreement(directory, hf)


def test_qwen3_in_the_engine_alone_and_batched(qwen3):
    directory, _, expected = qwen3
    check_engine(directory, expected)


def test_qwen3_through_http(qwen3, lmserve_server_factory):
    directory, _, expected = qwen3
    check_http(lmserve_server_factory, directory, expected)


def test_qwen3_from_llama_cpps_converter_equals_transformers(qwen3_gguf):
    gguf, hf = qwen3_gguf
    check_stepwise_logits(gguf, hf)
    expected = [hf_greedy(hf, ids) for ids in PROMPTS]
    check_engine(gguf, expected)


def test_qwen3_split_over_two_ranks_gives_the_same_tokens(qwen3):
    directory, _, expected = qwen3
    assert engine_greedy(directory, batched=True, tensor_parallel_size=2, cache_max_entry_count=128) == expected


def test_a_split_of_the_heads_is_refused_before_loading(qwen3):
    directory, _, _ = qwen3
    with pytest.raises(ValueError, match=r"--tp 3 does not split .* 4 attention heads and 2 key/value heads.*"
                                         r"valid sizes: 1, 2, 4\."):
        check_parallel(directory, EngineConfig(tensor_parallel_size=3))


def test_qwen3_cached_prefixes_and_sessions_equal_fresh_requests(qwen3):
    check_cached_prefixes_and_sessions(qwen3[0])
