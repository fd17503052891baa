"""The Gemma 3 family (its text model) against HF transformers (tests/family_checks.py): six
layers in Gemma 3's own pattern (five sliding with a window of 8, shorter than the long prompt,
then a global one; llama.cpp's converter assumes that pattern), a local rotary base unlike the
global one, linear rope scaling on the global layer, q/k norms, ``query_pre_attn_scalar``
unlike ``head_dim``; and the same converted to GGUF by llama.cpp's converter."""

from __future__ import annotations

import dataclasses

import pytest

from lmserve.backends.torch.models.gemma2 import FULL, SLIDING
from lmserve.backends.torch.models.gemma3 import Gemma3Family, Gemma3ForCausalLM
from lmserve.backends.torch.weights import load_model, read_model_config
from tests.backends.families.test_gemma2 import (
    WEIGHTS,
    check_compiled_decodes_equal_eager_ones,
)
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
    write_smollm2_tokenizer,
)

TINY = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 6, "num_attention_heads": 4,
        "num_key_value_heads": 2, "head_dim": 16, "max_position_embeddings": 512, "rms_norm_eps": 1e-6,
        "sliding_window": 8, "rope_theta": 10000.0, "rope_local_base_freq": 100.0,
        "rope_scaling": {"rope_type": "linear", "factor": 8.0}, "tie_word_embeddings": True}


@pytest.fixture(scope="module")
def gemma3(tmp_path_factory, smollm2_tokenizer_files):
    directory = tmp_path_factory.mktemp("gemma3")
    tokenizer = write_smollm2_tokenizer(directory, smollm2_tokenizer_files)
    write_family_model(directory, "Gemma3TextConfig", tokenizer=tokenizer, query_pre_attn_scalar=24,
                       **WEIGHTS, **TINY)
    return directory, load_hf_model(directory)


@pytest.fixture(scope="module")
def gemma3_gguf(tmp_path_factory, smollm2_tokenizer_files):
    """llama.cpp's GGUF has no query_pre_attn_scalar: this model's equals its head_dim."""
    directory = tmp_path_factory.mktemp("gemma3-gguf")
    tokenizer = write_smollm2_tokenizer(directory, smollm2_tokenizer_files)
    write_family_model(directory, "Gemma3TextConfig", tokenizer=tokenizer, query_pre_attn_scalar=16, seed=1,
                       final_logit_softcapping=3.0, **WEIGHTS, **TINY)
    return convert_to_gguf(directory, directory / "gemma3.gguf"), load_hf_model(directory)


def test_gemma3_equals_transformers(gemma3):
    directory, hf = gemma3
    check_stepwise_logits(directory, hf)
    check_bf16_agreement(directory, hf)
    assert all(len(set(hf_greedy(hf, ids))) > 4 for ids in PROMPTS)  # not one token repeated


def test_each_gemma3_feature_changes_the_tiny_models_logits(gemma3):
    """With the global base on the sliding layers, without the global layer's scaling, its
    scale or its window, the model's logits differ from HF's far beyond the checks' tolerance."""
    directory, hf = gemma3
    config, model = load_model(directory)
    assert config.layer_types == (SLIDING,) * 5 + (FULL,)
    ids = PROMPTS[2]
    reference = hf_logits(hf, ids)
    for change in ({"local_rope_theta": None, "local_rope_scaling": None}, {"rope_scaling": None},
                   {"attention_scale": None}, {"sliding_window": None}):
        changed = dataclasses.replace(config, **change)
        changed_model = Gemma3ForCausalLM(changed)  # its rotary tables from the changed config
        changed_model.load_state_dict(model.state_dict())
        _, logits = our_stepwise(changed, changed_model, ids, [0])
        error = ((logits - reference).abs().amax(-1) / reference.abs().amax(-1)).max()
        assert error > 1e-2, change


def test_gemma3_in_the_engine_alone_and_batched(gemma3):
    directory, hf = gemma3
    expected = [hf_greedy(hf, ids) for ids in PROMPTS]
    check_engine(directory, expected)


def test_gemma3_through_http(gemma3, lmserve_server_factory):
    directory, hf = gemma3
    check_http(lmserve_server_factory, directory, [hf_greedy(hf, ids) for ids in PROMPTS])


def test_gemma3_from_llama_cpps_converter_equals_transformers(gemma3_gguf):
    gguf, hf = gemma3_gguf
    config = read_model_config(gguf)
    assert config.layer_types == (SLIDING,) * 5 + (FULL,) and config.sliding_window == 8
    assert (config.rope_theta, config.local_rope_theta, config.rope_scaling["factor"]) == (10000.0, 100.0, 8.0)
    assert config.final_logit_softcapping == 3.0
    check_stepwise_logits(gguf, hf)
    expected = [hf_greedy(hf, ids) for ids in PROMPTS]
    check_engine(gguf, expected)


def test_gemma3_compiled_decodes_equal_eager_decodes(gemma3):
    directory, _ = gemma3
    check_compiled_decodes_equal_eager_ones(directory)


GEMMA3_1B = {  # google/gemma-3-1b-it's config.json (transformers 4.50), shortened
    "architectures": ["Gemma3ForCausalLM"], "attn_logit_softcapping": None, "bos_token_id": 2,
    "eos_token_id": [1, 106], "final_logit_softcapping": None, "head_dim": 256,
    "hidden_activation": "gelu_pytorch_tanh", "hidden_size": 1152, "intermediate_size": 6912,
    "max_position_embeddings": 32768, "model_type": "gemma3_text", "num_attention_heads": 4,
    "num_hidden_layers": 26, "num_key_value_heads": 1, "pad_token_id": 0, "query_pre_attn_scalar": 256,
    "rms_norm_eps": 1e-06, "rope_local_base_freq": 10000, "rope_scaling": None, "rope_theta": 1000000,
    "sliding_window": 512, "sliding_window_pattern": 6, "vocab_size": 262144,
}


@pytest.mark.parametrize("variant", [
    {},
    {"rope_scaling": {"factor": 8.0, "rope_type": "linear"}},  # the 4B model's text config
    # The legacy "type" key, another pattern, rope_theta left out (None: not in config.json).
    {"rope_scaling": {"factor": 8.0, "type": "linear"}, "sliding_window_pattern": 3, "rope_theta": None},
    {"rope_parameters": {"full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 5e5},
                         "sliding_attention": {"rope_type": "default", "rope_theta": 2e4}},
     "layer_types": [SLIDING, FULL] * 13},
], ids=["1b", "4b", "legacy-type", "transformers-5"])
def test_gemma3_configs_read_as_transformers_reads_them(variant):
    import transformers

    raw = {key: value for key, value in {**GEMMA3_1B, **variant}.items() if variant.get(key, ...) is not None}
    config = Gemma3Family().read_hf_config(raw, None)
    hf = transformers.Gemma3TextConfig(**{k: v for k, v in raw.items() if v is not None})
    assert config.layer_types == tuple(hf.layer_types)
    full, sliding = hf.rope_parameters[FULL], hf.rope_parameters[SLIDING]
    assert config.rope_theta == full["rope_theta"] and config.local_rope_theta == sliding["rope_theta"]
    for ours, theirs in ((config.rope_scaling, full), (config.local_rope_scaling, sliding)):
        if theirs["rope_type"] == "default":
            assert ours is None
        else:
            assert (ours["rope_type"], ours["factor"]) == (theirs["rope_type"], theirs["factor"])
    assert config.attention_scale == 256 ** -0.5 and config.sliding_window == 512
    assert config.attn_logit_softcapping is None and config.final_logit_softcapping is None


def test_what_gemma3_cannot_run_is_refused_by_name():
    from lmserve.backends.torch.models.family import read_hf_config

    vision = {"architectures": ["Gemma3ForConditionalGeneration"], "model_type": "gemma3",
              "text_config": GEMMA3_1B, "vision_config": {"model_type": "siglip_vision_model"}}
    with pytest.raises(ValueError, match="unsupported architecture Gemma3ForConditionalGeneration"):
        read_hf_config(vision)
    with pytest.raises(ValueError, match="vision"):
        Gemma3Family().read_hf_config(vision, None)
    with pytest.raises(ValueError, match="use_bidirectional_attention"):
        Gemma3Family().read_hf_config({**GEMMA3_1B, "use_bidirectional_attention": True}, None)
    with pytest.raises(ValueError, match="rope_scaling type 'yarn'"):
        Gemma3Family().read_hf_config({**GEMMA3_1B, "rope_scaling": {"rope_type": "yarn", "factor": 2.0}}, None)


def test_gemma3_gguf_metadata_read_as_llama_cpp_does():
    fields = {"general.architecture": "gemma3", "gemma3.embedding_length": 5376, "gemma3.block_count": 62,
              "gemma3.attention.head_count": 32, "gemma3.attention.head_count_kv": 16,
              "gemma3.attention.key_length": 128, "gemma3.feed_forward_length": 21504,
              "gemma3.context_length": 131072, "gemma3.rope.freq_base": 1e6, "gemma3.attention.sliding_window": 1024,
              "gemma3.rope.scaling.type": "linear", "gemma3.rope.scaling.factor": 8.0}
    shapes = {"token_embd.weight": (262144, 5376)}
    config = Gemma3Family().read_gguf_config(fields, shapes)
    assert config.attention_scale == 168 ** -0.5  # the 27B model: (hidden / heads) ** -0.5
    assert config.layer_types[:6] == (SLIDING,) * 5 + (FULL,) and config.sliding_window == 1024
    local = config.local_rope_config()  # older files lack rope.freq_base_swa: llama.cpp's 10000, unscaled
    assert (local.rope_theta, local.rope_scaling) == (10000.0, None) and config.rope_scaling["factor"] == 8.0
    no_window = Gemma3Family().read_gguf_config({**fields, "gemma3.attention.sliding_window": 0}, shapes)
    assert no_window.layer_types == (FULL,) * 62 and no_window.local_rope_config() is None


def test_gemma3_cached_prefixes_and_sessions_equal_fresh_requests(gemma3):
    check_cached_prefixes_and_sessions(gemma3[0])
