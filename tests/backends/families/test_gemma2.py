"""The Gemma 2 family against HF transformers (tests/family_checks.py): four layers alternating
sliding (a window of 8, shorter than the long prompt) and global, attention scores and final
logits soft-capped with caps small enough to bite on tiny weights, ``query_pre_attn_scalar``
unlike ``head_dim``; and the same converted to GGUF by llama.cpp's converter."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from lmserve.backends.torch.model_config import ModelConfig
from lmserve.backends.torch.model_runner import ModelRunner
from lmserve.backends.torch.models.gemma2 import FULL, SLIDING, Gemma2Family
from lmserve.backends.torch.paged_cache import PagedKVCache
from lmserve.backends.torch.weights import load_model, read_model_config
from tests.backends.test_compiled_step import BLOCK_SIZE, NUM_BLOCKS, greedy_decodes
from tests.family_checks import (
    check_http,
    check_engine,
    check_cached_prefixes_and_sessions,
    PROMPTS,
    check_bf16_agreement,
    check_stepwise_logits,
    convert_to_gguf,
    hf_greedy,
    hf_logits,
    load_hf_model,
    our_stepwise,
    write_family_model,
    write_sentencepiece_tokenizer,
)

TINY = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 4, "num_attention_heads": 4,
        "num_key_value_heads": 2, "head_dim": 16, "max_position_embeddings": 512, "rms_norm_eps": 1e-6,
        "sliding_window": 8, "attn_logit_softcapping": 5.0, "final_logit_softcapping": 1.0,
        "tie_word_embeddings": True}
#: Weights that keep tied, sqrt(hidden)-scaled embeddings from repeating the last token.
WEIGHTS = {"norm_center": 0.0, "embedding_scale": 1 / 80, "projection_scale": 3.0}


@pytest.fixture(scope="module")
def gemma2(tmp_path_factory):
    """With the tiny byte-level BPE tokenizer: the texts of a random model's tokens compare
    exactly through it (Gemma's own sentencepiece-style tokenizer is served in
    tests/plugins/test_sentencepiece_serving.py)."""
    directory = tmp_path_factory.mktemp("gemma2")
    write_family_model(directory, "Gemma2Config", query_pre_attn_scalar=24, **WEIGHTS, **TINY)
    return directory, load_hf_model(directory)


@pytest.fixture(scope="module")
def gemma2_gguf(tmp_path_factory):
    """With a sentencepiece tokenizer (llama.cpp's converter reads Gemma 2's vocabulary from
    nothing else). llama.cpp's GGUF has no query_pre_attn_scalar (llama.cpp scales by
    head_dim ** -0.5 but for the 27B model): this model's equals its head_dim."""
    directory = tmp_path_factory.mktemp("gemma2-gguf")
    tokenizer = write_sentencepiece_tokenizer(directory)
    write_family_model(directory, "Gemma2Config", tokenizer=tokenizer, query_pre_attn_scalar=16, seed=1,
                       **WEIGHTS, **TINY)
    return convert_to_gguf(directory, directory / "gemma2.gguf"), load_hf_model(directory)


def test_gemma2_equals_transformers(gemma2):
    directory, hf = gemma2
    check_stepwise_logits(directory, hf)
    check_bf16_agreement(directory, hf)
    assert all(len(set(hf_greedy(hf, ids))) > 4 for ids in PROMPTS)  # not one token repeated


def test_each_gemma2_feature_changes_the_tiny_models_logits(gemma2):
    """Without its soft-caps, its scale or its window, or with a window one shorter (HF's window
    of W attends to the W latest positions, the current one included), the model's logits
    differ from HF's far beyond the checks' tolerance: the checks above hold each to account."""
    directory, hf = gemma2
    config, model = load_model(directory)
    ids = PROMPTS[2]
    reference = hf_logits(hf, ids)
    for change in ({"attn_logit_softcapping": None}, {"final_logit_softcapping": None},
                   {"attention_scale": None}, {"sliding_window": None}, {"sliding_window": 7}):
        changed = dataclasses.replace(config, **change)
        model.config = changed
        _, logits = our_stepwise(changed, model, ids, [0])
        error = ((logits - reference).abs().amax(-1) / reference.abs().amax(-1)).max()
        assert error > 1e-2, change
    model.config = config


def test_gemma2_in_the_engine_alone_and_batched(gemma2):
    directory, hf = gemma2
    expected = [hf_greedy(hf, ids) for ids in PROMPTS]
    check_engine(directory, expected)


def test_gemma2_through_http(gemma2, lmserve_server_factory):
    directory, hf = gemma2
    check_http(lmserve_server_factory, directory, [hf_greedy(hf, ids) for ids in PROMPTS])


def test_gemma2_from_llama_cpps_converter_equals_transformers(gemma2_gguf):
    gguf, hf = gemma2_gguf
    config = read_model_config(gguf)
    assert config.layer_types == (SLIDING, FULL, SLIDING, FULL) and config.sliding_window == 8
    assert (config.attn_logit_softcapping, config.final_logit_softcapping) == (5.0, 1.0)
    check_stepwise_logits(gguf, hf)
    expected = [hf_greedy(hf, ids) for ids in PROMPTS]
    check_engine(gguf, expected)


def check_compiled_decodes_equal_eager_ones(path) -> None:
    """The compiled decode step (one traced graph of every layer, its window and soft-cap
    included) gives the eager step's logits, step after step, without falling back."""
    config, model = load_model(path)
    model.fuse_projections()
    prompts = [tuple(range(5, 25)), (7, 8), tuple(range(40, 53))]  # the first longer than the window
    runs = []
    with torch.inference_mode():
        for compiled in (True, False):
            cache = PagedKVCache.allocate(config, NUM_BLOCKS, BLOCK_SIZE, torch.float32, "cpu")
            runner = ModelRunner(model, cache, torch.device("cpu"), compile_decodes=compiled)
            runs.append(greedy_decodes(runner, prompts))
            assert (runner.decode_step is not None) == compiled  # a failed compiled step falls back to None
    for step, (got, expected) in enumerate(zip(*runs)):
        assert torch.equal(got.argmax(-1), expected.argmax(-1)), step
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_gemma2_compiled_decodes_equal_eager_decodes(gemma2):
    directory, _ = gemma2
    check_compiled_decodes_equal_eager_ones(directory)


GEMMA2_2B = {  # google/gemma-2-2b-it's config.json (transformers 4.42), shortened
    "architectures": ["Gemma2ForCausalLM"], "attn_logit_softcapping": 50.0, "bos_token_id": 2,
    "cache_implementation": "hybrid", "eos_token_id": [1, 107], "final_logit_softcapping": 30.0, "head_dim": 256,
    "hidden_act": "gelu_pytorch_tanh", "hidden_activation": "gelu_pytorch_tanh", "hidden_size": 2304,
    "intermediate_size": 9216, "max_position_embeddings": 8192, "model_type": "gemma2", "num_attention_heads": 8,
    "num_hidden_layers": 26, "num_key_value_heads": 4, "pad_token_id": 0, "query_pre_attn_scalar": 256,
    "rms_norm_eps": 1e-06, "rope_theta": 10000.0, "sliding_window": 4096, "vocab_size": 256000,
}


def test_gemma2_configs_of_transformers_4_read_as_transformers_5_does():
    import transformers

    config = Gemma2Family().read_hf_config(GEMMA2_2B, None)
    hf = transformers.Gemma2Config(**GEMMA2_2B)
    assert config.layer_types == tuple(hf.layer_types) and config.layer_types[:2] == (SLIDING, FULL)
    assert config.sliding_window == hf.sliding_window == 4096
    assert config.tie_word_embeddings and config.attention_scale == 256 ** -0.5
    assert (config.attn_logit_softcapping, config.final_logit_softcapping) == (50.0, 30.0)
    assert config.eos_token_ids == (1, 107) and config.rope_theta == 10000.0 and config.rope_scaling is None
    uncapped = Gemma2Family().read_hf_config({**GEMMA2_2B, "attn_logit_softcapping": None}, None)
    assert uncapped.attn_logit_softcapping is None
    with pytest.raises(ValueError, match="use_bidirectional_attention"):
        Gemma2Family().read_hf_config({**GEMMA2_2B, "use_bidirectional_attention": True}, None)
    with pytest.raises(ValueError, match="hidden_activation 'relu'"):
        Gemma2Family().read_hf_config({**GEMMA2_2B, "hidden_activation": "relu"}, None)


def gemma2_gguf_fields(**extra) -> dict:
    fields = {"general.architecture": "gemma2", "gemma2.embedding_length": 4608, "gemma2.block_count": 46,
              "gemma2.attention.head_count": 32, "gemma2.attention.head_count_kv": 16,
              "gemma2.attention.key_length": 128, "gemma2.feed_forward_length": 36864, "gemma2.context_length": 8192}
    return {**fields, **extra}


def test_gemma2_gguf_metadata_read_as_llama_cpp_does():
    shapes = {"token_embd.weight": (256000, 4608)}
    # The 27B model (46 layers) scales by (hidden / heads) ** -0.5 = 144 ** -0.5, not head_dim's 128.
    config = Gemma2Family().read_gguf_config(gemma2_gguf_fields(), shapes)
    assert config.attention_scale == 144 ** -0.5 and config.tie_word_embeddings
    # What the converter leaves out: llama.cpp's defaults (window 4096, caps 50 and 30, every second layer global).
    assert (config.sliding_window, config.attn_logit_softcapping, config.final_logit_softcapping) == (4096, 50.0, 30.0)
    assert config.layer_types[:4] == (SLIDING, FULL, SLIDING, FULL)
    other = Gemma2Family().read_gguf_config(gemma2_gguf_fields(**{
        "gemma2.block_count": 42, "gemma2.attention.sliding_window_pattern": 3,
        "gemma2.rope.freq_base_swa": 1000.0}), shapes)
    assert other.attention_scale is None  # head_dim ** -0.5
    assert other.layer_types[:3] == (SLIDING, SLIDING, FULL) and other.local_rope_config().rope_theta == 1000.0
    assert isinstance(other.local_rope_config(), ModelConfig)


def test_gemma2_cached_prefixes_and_sessions_equal_fresh_requests(gemma2):
    check_cached_prefixes_and_sessions(gemma2[0])
