"""The Mixtral family against HF transformers (tests/family_checks.py): a Mixtral whose sliding
window is shorter than the long prompt, as save_pretrained writes it (the hub's
``block_sparse_moe.experts.E.w1`` names) and in transformers 5's fused layout; a Mixtral
converted to GGUF by llama.cpp's converter (architecture ``llama`` with experts, which this
family claims ahead of the Llama family)."""

from __future__ import annotations

import pytest

from lmserve.backends.torch.models.family import family_for_gguf
from lmserve.backends.torch.weights import read_model_config
from tests.backends.families.fused_experts import write_fused_experts
from tests.family_checks import (
    check_http,
    check_engine,
    check_cached_prefixes_and_sessions,
    PROMPTS,
    check_bf16_agreement,
    check_stepwise_logits,
    convert_to_gguf,
    hf_greedy,
    load_hf_model,
    write_family_model,
    write_smollm2_tokenizer,
)

TINY = dict(hidden_size=64, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            head_dim=16, max_position_embeddings=512, rms_norm_eps=1e-6, num_local_experts=4, num_experts_per_tok=2)


@pytest.fixture(scope="module")
def mixtral(tmp_path_factory, smollm2_tokenizer_files):
    """The HF directory (window 8), HF's model, its greedy tokens."""
    directory = tmp_path_factory.mktemp("mixtral")
    tokenizer = write_smollm2_tokenizer(directory, smollm2_tokenizer_files)
    write_family_model(directory, "MixtralConfig", tokenizer=tokenizer, sliding_window=8, **TINY)
    hf = load_hf_model(directory)
    return directory, hf, [hf_greedy(hf, ids) for ids in PROMPTS]


@pytest.fixture(scope="module")
def mixtral_gguf(tmp_path_factory, smollm2_tokenizer_files):
    directory = tmp_path_factory.mktemp("mixtral-gguf")
    tokenizer = write_smollm2_tokenizer(directory, smollm2_tokenizer_files)
    write_family_model(directory, "MixtralConfig", tokenizer=tokenizer, seed=2, **TINY)
    return convert_to_gguf(directory, directory / "mixtral.gguf"), load_hf_model(directory)


def test_mixtral_with_a_short_window_equals_transformers(mixtral):
    directory, hf, _ = mixtral
    from safetensors import safe_open

    with safe_open(str(directory / "model.safetensors"), "pt") as f:  # the hub's layout
        assert "model.layers.0.block_sparse_moe.experts.3.w2.weight" in f.keys()
    check_stepwise_logits(directory, hf)
    check_bf16_agreement(directory, hf)


def test_mixtral_with_fused_experts_equals_transformers(mixtral, tmp_path):
    directory, hf, _ = mixtral
    fused = write_fused_experts(directory, tmp_path / "fused")
    from safetensors import safe_open

    with safe_open(str(fused / "model.safetensors"), "pt") as f:
        assert f.get_slice("model.layers.1.mlp.experts.down_proj").get_shape() == [4, 64, 32]
        assert "model.layers.1.mlp.gate.weight" in f.keys()
    check_stepwise_logits(fused, hf, PROMPTS[2:])


def test_mixtral_in_the_engine_alone_and_batched(mixtral):
    directory, _, expected = mixtral
    check_engine(directory, expected)


def test_mixtral_through_http(mixtral, lmserve_server_factory):
    directory, _, expected = mixtral
    check_http(lmserve_server_factory, directory, expected)


def test_a_llama_gguf_file_with_experts_is_mixtral(mixtral_gguf):
    gguf, _ = mixtral_gguf
    assert read_model_config(gguf).architecture == "MixtralForCausalLM"
    assert family_for_gguf({"general.architecture": "llama", "llama.expert_count": 8}).name == "mixtral"
    assert family_for_gguf({"general.architecture": "llama"}).name == "llama"
    assert family_for_gguf({"general.architecture": "llama", "llama.expert_count": 0}).name == "llama"


def test_mixtral_from_llama_cpps_converter_equals_transformers(mixtral_gguf):
    gguf, hf = mixtral_gguf
    check_stepwise_logits(gguf, hf)
    expected = [hf_greedy(hf, ids) for ids in PROMPTS]
    check_engine(gguf, expected)


def test_mixtral_cached_prefixes_and_sessions_equal_fresh_requests(mixtral):
    check_cached_prefixes_and_sessions(mixtral[0])
