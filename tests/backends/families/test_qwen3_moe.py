"""The Qwen3-MoE family against HF transformers (tests/family_checks.py): a Qwen3-MoE with one
dense layer (``mlp_only_layers``) and unnormalised top-k weights, as save_pretrained writes it
(per-expert tensors) and in transformers 5's fused 3-D layout; one converted to GGUF by
llama.cpp's converter (every layer sparse, renormalised: all llama.cpp runs); the sparse block's
grouping of tokens by expert; the split over two ranks and the splits refused."""

from __future__ import annotations

import json

import pytest
import torch

from lmserve.backends.torch.attention import layer_attention
from lmserve.backends.torch.factory import EngineConfig, check_parallel, load_engine_model
from lmserve.backends.torch.model_runner import ModelRunner
from lmserve.backends.torch.models.moe import Router, SparseMoE
from lmserve.backends.torch.paged_cache import PagedKVCache
from lmserve.backends.torch.weights import load_model
from tests.backends.families.fused_experts import write_fused_experts
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
from tests.reference_kv_cache import KVCache

TINY = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
            max_position_embeddings=512, rms_norm_eps=1e-6, num_experts_per_tok=2, moe_intermediate_size=32)


@pytest.fixture(scope="module")
def qwen3_moe(tmp_path_factory, smollm2_tokenizer_files):
    """The HF directory (3 layers, the middle one dense; 8 experts, top 2), HF's model, its greedy tokens."""
    directory = tmp_path_factory.mktemp("qwen3-moe")
    tokenizer = write_smollm2_tokenizer(directory, smollm2_tokenizer_files)
    write_family_model(directory, "Qwen3MoeConfig", tokenizer=tokenizer, num_hidden_layers=3, num_experts=8,
                       mlp_only_layers=[1], norm_topk_prob=False, **TINY)
    hf = load_hf_model(directory)
    assert type(hf.model.layers[1].mlp).__name__ == "Qwen3MoeMLP"
    return directory, hf, [hf_greedy(hf, ids) for ids in PROMPTS]


@pytest.fixture(scope="module")
def qwen3_moe_gguf(tmp_path_factory, smollm2_tokenizer_files):
    directory = tmp_path_factory.mktemp("qwen3-moe-gguf")
    tokenizer = write_smollm2_tokenizer(directory, smollm2_tokenizer_files)
    write_family_model(directory, "Qwen3MoeConfig", tokenizer=tokenizer, seed=1, num_hidden_layers=2, num_experts=4,
                       norm_topk_prob=True, **TINY)
    return convert_to_gguf(directory, directory / "qwen3moe.gguf"), load_hf_model(directory)


def test_qwen3_moe_equals_transformers(qwen3_moe):
    directory, hf, _ = qwen3_moe
    check_stepwise_logits(directory, hf)
    check_bf16_agreement(directory, hf)


def test_qwen3_moe_with_fused_experts_equals_transformers(qwen3_moe, tmp_path):
    directory, hf, _ = qwen3_moe
    fused = write_fused_experts(directory, tmp_path / "fused")
    from safetensors import safe_open

    with safe_open(str(fused / "model.safetensors"), "pt") as f:
        assert f.get_slice("model.layers.0.mlp.experts.gate_up_proj").get_shape() == [8, 64, 64]
        assert not any(".experts.0." in name for name in f.keys())
    check_stepwise_logits(fused, hf, PROMPTS[1:2])


def test_qwen3_moe_in_the_engine_alone_and_batched(qwen3_moe):
    directory, _, expected = qwen3_moe
    check_engine(directory, expected)


def test_qwen3_moe_through_http(qwen3_moe, lmserve_server_factory):
    directory, _, expected = qwen3_moe
    check_http(lmserve_server_factory, directory, expected)


def test_qwen3_moe_from_llama_cpps_converter_equals_transformers(qwen3_moe_gguf):
    gguf, hf = qwen3_moe_gguf
    check_stepwise_logits(gguf, hf)
    expected = [hf_greedy(hf, ids) for ids in PROMPTS]
    check_engine(gguf, expected)


def test_a_batch_routed_to_different_experts_equals_each_token_alone():
    torch.manual_seed(0)
    block = SparseMoE(hidden_size=32, intermediate_size=16, num_experts=8, top_k=2, normalize=False).eval()
    for parameter in block.parameters():
        torch.nn.init.normal_(parameter, std=0.5)
    x = torch.randn(40, 32)
    experts, weights = block.gate.route(x)
    assert len(set(experts.flatten().tolist())) == 8 and len({tuple(row) for row in experts.tolist()}) > 10
    with torch.no_grad():
        batched = block(x)
        alone = torch.cat([block(x[i : i + 1]) for i in range(len(x))])
        # Each token's own top-2 experts, weighted, one token and one expert at a time.
        reference = torch.stack([sum(w * block.experts[e](x[t : t + 1])[0] for e, w in zip(experts[t], weights[t]))
                                 for t in range(len(x))])
    tolerance = dict(rtol=0, atol=1e-5 * float(reference.abs().max()))  # float32 sums in another order
    torch.testing.assert_close(batched, reference, **tolerance)
    torch.testing.assert_close(alone, reference, **tolerance)


def test_the_experts_are_quantized_and_the_router_is_not(qwen3_moe):
    from lmserve.backends.torch.quantized_linear import Int8Linear

    directory, _, _ = qwen3_moe
    model = load_engine_model(directory, EngineConfig(dtype="float32", quantization="int8")).model
    sparse = model.model.layers[0].mlp
    assert type(sparse.gate) is Router
    assert all(isinstance(expert.gate_up_proj, Int8Linear) and isinstance(expert.down_proj, Int8Linear)
               for expert in sparse.experts)
    config = model.config
    kv_cache = KVCache.allocate(config, 16, torch.float32, "cpu")
    hidden = model(torch.tensor(PROMPTS[1]), torch.arange(len(PROMPTS[1])), kv_cache)
    assert torch.isfinite(model.compute_logits(hidden)).all()


def test_moe_decodes_are_not_compiled(qwen3_moe):
    directory, _, _ = qwen3_moe
    config, model = load_model(directory)
    kv_cache = PagedKVCache(config.num_hidden_layers, 4, 16, config.num_key_value_heads, config.head_dim,
                            torch.float32, torch.device("cpu"), layer_attention(config))
    assert ModelRunner(model, kv_cache, torch.device("cpu"), compile_decodes=True).decode_step is None
    model.compiled_decodes = True  # what a dense model says
    assert ModelRunner(model, kv_cache, torch.device("cpu"), compile_decodes=True).decode_step is not None


def test_qwen3_moe_split_over_two_ranks_gives_the_same_tokens(qwen3_moe):
    directory, _, expected = qwen3_moe
    assert engine_greedy(directory, batched=True, tensor_parallel_size=2, cache_max_entry_count=128) == expected


def test_splits_of_the_heads_or_the_experts_are_refused_before_loading(qwen3_moe, tmp_path):
    directory, _, _ = qwen3_moe
    with pytest.raises(ValueError, match=r"--tp 3 does not split .* 4 attention heads"):
        check_parallel(directory, EngineConfig(tensor_parallel_size=3))
    check_parallel(directory, EngineConfig(tensor_parallel_size=4))  # 32 / 4
    odd = tmp_path / "odd"  # a config alone: nothing to load
    odd.mkdir()
    config = json.loads((directory / "config.json").read_text())
    (odd / "config.json").write_text(json.dumps({**config, "moe_intermediate_size": 30}))
    with pytest.raises(ValueError, match=r"--tp 4 does not split this model's experts \(inner size 30\) evenly; "
                                         r"valid sizes: 1, 2\."):
        check_parallel(odd, EngineConfig(tensor_parallel_size=4))


def test_qwen3_moe_cached_prefixes_and_sessions_equal_fresh_requests(qwen3_moe):
    check_cached_prefixes_and_sessions(qwen3_moe[0])
