"""The Llama family against HF transformers (tests/family_checks.py): a Mistral whose sliding
window is shorter than the long prompt, and a Llama converted to GGUF by llama.cpp's converter."""

from __future__ import annotations

import pytest

from tests.family_checks import (
    check_http,
    check_engine,
    PROMPTS,
    check_bf16_agreement,
    check_cached_prefixes_and_sessions,
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
def mistral(tmp_path_factory, smollm2_tokenizer_files):
    directory = tmp_path_factory.mktemp("mistral")
    tokenizer = write_smollm2_tokenizer(directory, smollm2_tokenizer_files)
    write_family_model(directory, "MistralConfig", tokenizer=tokenizer, sliding_window=8, **TINY)
    return directory, load_hf_model(directory)


@pytest.fixture(scope="module")
def llama_gguf(tmp_path_factory, smollm2_tokenizer_files):
    directory = tmp_path_factory.mktemp("llama")
    tokenizer = write_smollm2_tokenizer(directory, smollm2_tokenizer_files)
    write_family_model(directory, "LlamaConfig", tokenizer=tokenizer, **TINY)
    return convert_to_gguf(directory, directory / "llama.gguf"), load_hf_model(directory)


def test_mistral_with_a_short_window_equals_transformers(mistral):
    directory, hf = mistral
    check_stepwise_logits(directory, hf)
    check_bf16_agreement(directory, hf)


def test_mistral_in_the_engine_alone_and_batched(mistral):
    directory, hf = mistral
    expected = [hf_greedy(hf, ids) for ids in PROMPTS]
    check_engine(directory, expected)


def test_mistral_cached_prefixes_and_sessions_equal_fresh_requests(mistral):
    check_cached_prefixes_and_sessions(mistral[0])


def test_mistral_through_http(mistral, lmserve_server_factory):
    directory, hf = mistral
    check_http(lmserve_server_factory, directory, [hf_greedy(hf, ids) for ids in PROMPTS])


def test_llama_from_llama_cpps_converter_equals_transformers(llama_gguf):
    gguf, hf = llama_gguf
    check_stepwise_logits(gguf, hf)
    assert engine_greedy(gguf, batched=True) == [hf_greedy(hf, ids) for ids in PROMPTS]
