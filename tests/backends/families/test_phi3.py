"""The Phi-3 family against HF transformers (tests/family_checks.py): a Phi-3 whose sliding
window is shorter than the long prompt, one with partial rotary embeddings, and two with
LongRoPE and Phi-4-mini's partial rotary (one serving past ``original_max_position_embeddings``,
one within it), each also converted to GGUF by llama.cpp's converter (fused ``attn_qkv``
and ``ffn_up``, LongRoPE factors as tensors).

LongRoPE's factors are chosen once per model (backends/torch/models/phi3.py): a model whose
context exceeds ``original_max_position_embeddings`` (40 here) uses the long ones, and is
checked on sequences longer than that from their prompt on (where transformers uses them
too) and, teacher-forced, on one that crosses it; a model whose context does not exceed it
uses the short ones, checked on a sequence that stays within it.
"""

from __future__ import annotations

import json

import pytest
import torch

from tests.family_checks import (
    check_engine,
    check_cached_prefixes_and_sessions,
    PROMPTS,
    RELATIVE_TOLERANCE,
    check_bf16_agreement,
    check_stepwise_logits,
    convert_to_gguf,
    decode_texts,
    engine_greedy,
    hf_greedy,
    hf_logits,
    load_hf_model,
    our_stepwise,
    server_greedy_texts,
    write_family_model,
    write_smollm2_tokenizer,
)

TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-5)
ORIGINAL_MAX = 40
#: Phi-4-mini's share of each head that rotates (12 of 16 dimensions here: 6 frequencies).
LONGROPE = dict(partial_rotary_factor=0.75, original_max_position_embeddings=ORIGINAL_MAX, rope_scaling={
    "rope_type": "longrope", "short_factor": [1.0, 1.1, 1.3, 1.6, 2.0, 2.5],
    "long_factor": [1.0, 2.0, 4.0, 8.0, 16.0, 32.0]})
#: Prompts longer than ORIGINAL_MAX: wholly past it from the first step on.
LONG_PROMPTS = [PROMPTS[2], PROMPTS[2][5:] + PROMPTS[1], PROMPTS[1] + PROMPTS[2]]


def write_phi3(directory, tokenizer_files, **config):
    """A tiny Phi-3 with SmolLM2's tokenizer, declared as Phi-4-mini's GPT2Tokenizer (the
    class llama.cpp's converter reads a byte-level BPE vocabulary for)."""
    tokenizer = write_smollm2_tokenizer(directory, tokenizer_files)
    tokenizer_config = json.loads((directory / "tokenizer_config.json").read_text())
    tokenizer_config["tokenizer_class"] = "GPT2Tokenizer"
    (directory / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    write_family_model(directory, "Phi3Config", tokenizer=tokenizer, **dict(TINY, **config))
    return directory


@pytest.fixture(scope="module")
def phi3(tmp_path_factory, smollm2_tokenizer_files):
    directory = write_phi3(tmp_path_factory.mktemp("phi3"), smollm2_tokenizer_files, sliding_window=16)
    return directory, convert_to_gguf(directory, directory / "phi3.gguf"), load_hf_model(directory)


@pytest.fixture(scope="module")
def phi3_partial(tmp_path_factory, smollm2_tokenizer_files):
    directory = write_phi3(tmp_path_factory.mktemp("phi3-partial"), smollm2_tokenizer_files,
                           partial_rotary_factor=0.5)
    return directory, convert_to_gguf(directory, directory / "phi3.gguf"), load_hf_model(directory)


@pytest.fixture(scope="module")
def phi3_longrope(tmp_path_factory, smollm2_tokenizer_files):
    directory = write_phi3(tmp_path_factory.mktemp("phi3-longrope"), smollm2_tokenizer_files, **LONGROPE)
    return directory, convert_to_gguf(directory, directory / "phi3.gguf"), load_hf_model(directory)


@pytest.fixture(scope="module")
def phi3_longrope_short(tmp_path_factory, smollm2_tokenizer_files):
    """LongRoPE on a model whose context is ``original_max_position_embeddings``: the short factors."""
    directory = write_phi3(tmp_path_factory.mktemp("phi3-longrope-short"), smollm2_tokenizer_files,
                           **dict(LONGROPE, max_position_embeddings=ORIGINAL_MAX))
    return directory, convert_to_gguf(directory, directory / "phi3.gguf"), load_hf_model(directory)


def test_phi3_with_a_short_window_equals_transformers(phi3):
    directory, gguf, hf = phi3
    check_stepwise_logits(directory, hf)
    check_stepwise_logits(gguf, hf)
    check_bf16_agreement(directory, hf)


def test_phi3_in_the_engine_alone_and_batched(phi3):
    directory, gguf, hf = phi3
    expected = [hf_greedy(hf, ids) for ids in PROMPTS]
    for path in (directory, gguf):
        assert engine_greedy(path, batched=False) == expected
        assert engine_greedy(path, batched=True) == expected


def test_partial_rotary_equals_transformers(phi3_partial):
    directory, gguf, hf = phi3_partial
    check_stepwise_logits(directory, hf)
    check_stepwise_logits(gguf, hf, prompts=PROMPTS[2:])
    assert engine_greedy(gguf, PROMPTS[2:], batched=True) == [hf_greedy(hf, PROMPTS[2])]


def test_longrope_past_the_original_length_equals_transformers(phi3_longrope):
    directory, gguf, hf = phi3_longrope
    check_stepwise_logits(directory, hf, prompts=LONG_PROMPTS[:1])
    check_stepwise_logits(gguf, hf, prompts=LONG_PROMPTS[:1])
    expected = [hf_greedy(hf, LONG_PROMPTS[0])]
    check_engine(directory, expected, LONG_PROMPTS[:1])
    assert engine_greedy(gguf, LONG_PROMPTS[:1], batched=True) == expected
    check_bf16_agreement(directory, hf)


def test_longrope_crossing_the_original_length_equals_transformers_from_there_on(phi3_longrope):
    """A prompt of 11 tokens and 32 more cross position 40. transformers' ``generate`` picks
    the next tokens with the short factors up to there, then recomputes everything with the
    long ones; this model uses the long ones throughout. Given the same tokens, its logits
    at every position equal transformers' over the whole (long) sequence."""
    directory, _, hf = phi3_longrope
    from lmserve.backends.torch.weights import load_model

    config, model = load_model(directory)
    prompt = PROMPTS[1]
    tokens = hf_greedy(hf, prompt)
    assert len(prompt) < ORIGINAL_MAX < len(prompt) + len(tokens) - 1
    _, logits = our_stepwise(config, model, prompt, tokens)
    reference = hf_logits(hf, prompt + tokens[:-1])
    error = (logits - reference).abs().amax(-1) / reference.abs().amax(-1)
    assert error.max() <= RELATIVE_TOLERANCE, f"relative error {error.max():.3g} at position {int(error.argmax())}"


def test_longrope_within_the_original_length_equals_transformers(phi3_longrope_short):
    directory, gguf, hf = phi3_longrope_short
    prompts = PROMPTS[:1]  # 3 tokens and 32 more: within the model's 40 positions
    check_stepwise_logits(directory, hf, prompts=prompts)
    check_stepwise_logits(gguf, hf, prompts=prompts)
    assert engine_greedy(gguf, prompts, batched=False) == [hf_greedy(hf, prompts[0])]


def test_longrope_factors_and_attention_factor_follow_transformers():
    """The config reader's rotary tables against transformers' own Phi3RotaryEmbedding, for
    the ways a config.json spells LongRoPE (old ``su`` with a top-level ``rope_theta``, an
    explicit ``factor`` or ``attention_factor``) and both kinds of factors."""
    import transformers
    from transformers.models.phi3.modeling_phi3 import Phi3RotaryEmbedding

    from lmserve.backends.torch.models.phi3 import Phi3Family, phi3_rotary_embedding

    factors = dict(short_factor=[1.0, 1.5, 3.0, 5.0], long_factor=[2.0, 3.0, 7.0, 11.0])
    base = dict(architectures=["Phi3ForCausalLM"], vocab_size=32, hidden_size=32, intermediate_size=64,
                num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, rope_theta=5000.0,
                partial_rotary_factor=0.5, original_max_position_embeddings=16)
    cases = [dict(max_position_embeddings=128, rope_scaling={"type": "su", **factors}),
             dict(max_position_embeddings=128, rope_scaling={"type": "longrope", "factor": 3.0, **factors}),
             dict(max_position_embeddings=128, rope_scaling={"rope_type": "longrope", "attention_factor": 1.7, **factors}),
             dict(max_position_embeddings=16, rope_scaling={"type": "longrope", "attention_factor": 1.2, **factors})]
    for case in cases:
        raw = dict(base, **case)
        hf_rotary = Phi3RotaryEmbedding(transformers.Phi3Config.from_dict(raw))
        config = Phi3Family().read_hf_config(raw, None)
        ours = phi3_rotary_embedding(config)
        ours.reset_parameters()
        # Positions past 16 for a model that serves them, within 16 for one that does not.
        length = 40 if config.uses_long_factors else 16
        assert config.uses_long_factors == (raw["max_position_embeddings"] > 16)
        positions = torch.arange(length)
        hf_cos, hf_sin = hf_rotary(torch.zeros(1, dtype=torch.float32), positions[None])
        cos, sin = ours(positions, torch.float32)
        assert cos.shape == (length, 8)
        torch.testing.assert_close(cos, hf_cos[0], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(sin, hf_sin[0], rtol=1e-6, atol=1e-6)


def test_config_readers_refuse_what_phi3_cannot_run():
    from lmserve.backends.torch.models.phi3 import Phi3Family

    base = dict(architectures=["Phi3ForCausalLM"], vocab_size=32, hidden_size=32, intermediate_size=64,
                num_hidden_layers=1, num_attention_heads=2)
    family = Phi3Family()
    with pytest.raises(ValueError, match="rope_scaling type 'dynamic'"):
        family.read_hf_config(dict(base, rope_scaling={"type": "dynamic", "factor": 2.0}), None)
    with pytest.raises(ValueError, match="long_factor has 3 entries"):
        family.read_hf_config(dict(base, rope_scaling={"type": "longrope", "short_factor": [1.0] * 8,
                                                       "long_factor": [1.0] * 3}), None)
    with pytest.raises(ValueError, match="odd or empty rotary dimension"):
        family.read_hf_config(dict(base, partial_rotary_factor=0.2), None)
    fields = {"general.architecture": "phi3", "phi3.embedding_length": 32, "phi3.attention.head_count": 2,
              "phi3.feed_forward_length": 64, "phi3.block_count": 1, "phi3.rope.dimension_count": 8,
              "phi3.rope.scaling.original_context_length": 16, "phi3.context_length": 64}
    shapes = {"token_embd.weight": (32, 32), "rope_factors_long.weight": (4,), "rope_factors_short.weight": (8,)}
    with pytest.raises(ValueError, match="rope_factors_short.weight has shape"):
        family.read_gguf_config(fields, shapes)
    config = family.read_gguf_config(fields, dict(shapes, **{"rope_factors_long.weight": (4,),
                                                             "rope_factors_short.weight": (4,)}))
    assert config.rotary_dim == 8 and config.uses_long_factors and config.sliding_window is None


def test_tensor_parallel_ranks_take_their_part_of_each_fused_tensor(phi3):
    """The fused qkv_proj and gate_up_proj split into their parts before a rank takes its
    heads and rows; splits the heads do not allow are refused before anything loads."""
    directory, _, _ = phi3
    from safetensors.torch import load_file

    from lmserve.backends.torch.models.phi3 import Phi3Family
    from lmserve.backends.torch.tensor_parallel import TensorParallel
    from lmserve.backends.torch.weights import load_model, read_model_config

    config = read_model_config(directory)
    with pytest.raises(ValueError, match="--tp 3"):
        Phi3Family().check_parallel(config, 3)
    Phi3Family().check_parallel(config, 2)
    _, model = load_model(directory, parallel=TensorParallel(rank=1, world_size=2))
    hf = load_file(str(directory / "model.safetensors"))
    qkv, gate_up = hf["model.layers.1.self_attn.qkv_proj.weight"], hf["model.layers.1.mlp.gate_up_proj.weight"]
    layer = model.model.layers[1]
    # 4 query heads and 2 key/value heads of 16: rank 1 has query heads 2-3, key/value head 1.
    assert torch.equal(layer.self_attn.q_proj.weight, qkv[32:64])
    assert torch.equal(layer.self_attn.k_proj.weight, qkv[64 + 16:64 + 32])
    assert torch.equal(layer.self_attn.v_proj.weight, qkv[96 + 16:96 + 32])
    assert torch.equal(layer.mlp.gate_proj.weight, gate_up[64:128])
    assert torch.equal(layer.mlp.up_proj.weight, gate_up[128 + 64:])


def test_phi3_with_longrope_through_http(phi3_longrope, lmserve_server_factory):
    """The server's compiled decode step (partial rotary, LongRoPE's scaled tables) gives
    transformers' tokens, one request at a time and concurrently."""
    directory, _, hf = phi3_longrope
    expected = decode_texts(directory, [hf_greedy(hf, ids) for ids in LONG_PROMPTS])
    server = lmserve_server_factory(model=directory)
    try:
        assert server_greedy_texts(server, LONG_PROMPTS, concurrently=False) == expected
        assert server_greedy_texts(server, LONG_PROMPTS, concurrently=True) == expected
        assert "decode step failed" not in server.log()
    finally:
        server.stop()


def test_phi3_cached_prefixes_and_sessions_equal_fresh_requests(phi3):
    check_cached_prefixes_and_sessions(phi3[0])
