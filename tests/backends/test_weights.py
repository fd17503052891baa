"""The torch engine's model, KV cache and weight loaders on tiny random models.

HF transformers is the reference: the same checkpoint must give the same fp32
logits, whether lmserve runs the prompt at once, token by token, or in chunks
through its KV cache.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from lmserve.backends.torch.model_config import ModelConfig
from lmserve.backends.torch.weights import load_model
from tests.reference_kv_cache import KVCache
from tiny_models import write_tiny_gguf_model, write_tiny_hf_model, write_tiny_internlm2_model

VOCAB = 128
NUM_TOKENS = 16
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
CASES = {
    "llama": dict(architecture="llama"),
    "llama-tied": dict(architecture="llama", tie_word_embeddings=True),
    "qwen2": dict(architecture="qwen2"),  # q/k/v biases
    "qwen2-tied": dict(architecture="qwen2", tie_word_embeddings=True),
    "mistral": dict(architecture="mistral"),
    "mistral-window-4": dict(architecture="mistral", sliding_window=4),
    "llama-bias": dict(architecture="llama", attention_bias=True),  # q/k/v and o biases
    "llama-rope-linear": dict(architecture="llama", rope_parameters={
        "rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0}),
    "llama3-rope": dict(architecture="llama", rope_parameters=LLAMA3_ROPE),
}
GGUF_CASES = ("llama", "llama-tied", "qwen2", "mistral", "llama-rope-linear", "llama3-rope")


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    """case name -> path of its tiny HF directory, written on first use."""
    root, made = tmp_path_factory.mktemp("tiny"), {}

    def get(case: str) -> Path:
        if case not in made:
            made[case] = write_tiny_hf_model(root / case, seed=len(made), vocab_size=VOCAB, **CASES[case])
        return made[case]

    return get


def token_ids(seed: int = 0, n: int = NUM_TOKENS) -> torch.Tensor:
    return torch.randint(0, VOCAB, (n,), generator=torch.Generator().manual_seed(seed))


def hf_logits(directory: Path, ids: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(ids[None]).logits[0]


def our_logits(config, model, ids: torch.Tensor, chunks: list[int] | None = None) -> torch.Tensor:
    """Logits of every position, running ``ids`` in chunks of the given sizes."""
    chunks = chunks or [len(ids)]
    assert sum(chunks) == len(ids)
    kv_cache = KVCache.allocate(config, 32, torch.float32, "cpu")
    out, start = [], 0
    for size in chunks:
        positions = torch.arange(start, start + size)
        out.append(model.compute_logits(model(ids[positions], positions, kv_cache)))
        start += size
    return torch.cat(out)


def assert_logits_close(ours: torch.Tensor, reference: torch.Tensor) -> None:
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-4)


# Prefill 5, decode one at a time, a chunked continuation of 3, then decode again.
INCREMENTAL = [5, 1, 1, 1, 1, 3, 1, 1, 1, 1]


@pytest.mark.parametrize("case", CASES)
def test_logits_match_transformers(tiny_dirs, case):
    directory, ids = tiny_dirs(case), token_ids()
    reference = hf_logits(directory, ids)
    config, model = load_model(directory)
    assert_logits_close(our_logits(config, model, ids), reference)
    assert_logits_close(our_logits(config, model, ids, INCREMENTAL), reference)


def test_dynamic_rope_matches_transformers(tmp_path):
    # Whole prompt past max_position_embeddings: the base grows with its length.
    directory = write_tiny_hf_model(tmp_path, max_position_embeddings=8, rope_parameters={
        "rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0})
    ids = token_ids()
    config, model = load_model(directory)
    assert config.rope_scaling == {"rope_type": "dynamic", "factor": 2.0}
    assert_logits_close(our_logits(config, model, ids), hf_logits(directory, ids))


def test_hf_config_reads_tied_bias_and_eos(tiny_dirs):
    config, model = load_model(tiny_dirs("qwen2-tied"))
    assert config.architecture == "Qwen2ForCausalLM"
    assert config.attention_bias and not config.attention_output_bias
    assert config.tie_word_embeddings
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert config.head_dim == 16 and config.num_queries_per_kv == 2


def test_hf_config_reads_old_rope_keys_and_generation_eos():
    old_style = {"architectures": ["LlamaForCausalLM"], "vocab_size": 10, "hidden_size": 8,
                 "intermediate_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2,
                 "rope_theta": 500000.0, "eos_token_id": 7,
                 "rope_scaling": {"type": "llama3", **{k: v for k, v in LLAMA3_ROPE.items()
                                                      if k not in ("rope_type", "rope_theta")}}}
    config = ModelConfig.from_hf_config(old_style, {"eos_token_id": [7, 9]})
    assert config.rope_theta == 500000.0 and config.rope_scaling["rope_type"] == "llama3"
    assert config.num_key_value_heads == 2 and config.eos_token_ids == (7, 9)


def test_internlm2_fused_wqkv_matches_llama(tiny_dirs, tmp_path):
    llama = tiny_dirs("llama")
    internlm2 = write_tiny_internlm2_model(tmp_path / "internlm2", llama)
    config, model = load_model(internlm2)
    assert config.architecture == "InternLM2ForCausalLM"
    llama_config, llama_model = load_model(llama)
    ids = token_ids()
    torch.testing.assert_close(our_logits(config, model, ids, INCREMENTAL),
                               our_logits(llama_config, llama_model, ids), rtol=0, atol=1e-5)


@pytest.mark.parametrize("case", GGUF_CASES)
def test_gguf_matches_safetensors(tiny_dirs, tmp_path, case):
    directory = tiny_dirs(case)
    gguf_path = write_tiny_gguf_model(tmp_path / "tiny.gguf", directory, bos_token_id=1, eos_token_id=2)
    gguf_config, gguf_model = load_model(gguf_path)
    hf_config, hf_model = load_model(directory)
    for field in ("vocab_size", "hidden_size", "num_hidden_layers", "num_key_value_heads", "head_dim",
                  "tie_word_embeddings", "attention_bias", "rope_theta", "bos_token_id", "eos_token_ids"):
        assert getattr(gguf_config, field) == getattr(hf_config, field), field
    ids = token_ids()
    reference = our_logits(hf_config, hf_model, ids)
    assert_logits_close(our_logits(gguf_config, gguf_model, ids, INCREMENTAL), reference)


def test_gguf_q8_0_is_dequantized_and_unpermuted(tiny_dirs, tmp_path):
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize, quantize

    directory = tiny_dirs("llama")
    config, model = load_model(write_tiny_gguf_model(tmp_path / "q8.gguf", directory, tensor_type="Q8_0"))
    hf_tensors = load_file(str(directory / "model.safetensors"))
    for name in ("model.layers.1.self_attn.q_proj.weight", "model.layers.1.self_attn.k_proj.weight",
                 "model.embed_tokens.weight", "model.layers.0.mlp.down_proj.weight"):
        # Q8_0 blocks run along rows, so the row permutation commutes with quantization.
        expected = dequantize(quantize(hf_tensors[name].numpy(), GGMLQuantizationType.Q8_0),
                              GGMLQuantizationType.Q8_0)
        assert torch.equal(model.get_parameter(name), torch.from_numpy(expected)), name
    f16_config, f16_model = load_model(write_tiny_gguf_model(tmp_path / "f16.gguf", directory,
                                                             tensor_type="F16"))
    ids = token_ids()
    torch.testing.assert_close(our_logits(f16_config, f16_model, ids),
                               our_logits(*load_model(directory), ids), rtol=0, atol=1e-2)


def test_sharded_checkpoint_and_progress(tiny_dirs, tmp_path):
    source = tiny_dirs("llama")
    tensors = load_file(str(source / "model.safetensors"))
    names = sorted(tensors)
    halves = {"model-00001-of-00002.safetensors": names[: len(names) // 2],
              "model-00002-of-00002.safetensors": names[len(names) // 2:]}
    weight_map = {}
    for file, part in halves.items():
        save_file({n: tensors[n] for n in part}, str(tmp_path / file))
        weight_map.update(dict.fromkeys(part, file))
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (tmp_path / "config.json").write_text((source / "config.json").read_text())
    calls = []
    config, model = load_model(tmp_path, progress=lambda done, total: calls.append((done, total)))
    assert calls == [(i, len(names)) for i in range(1, len(names) + 1)]
    ids = token_ids()
    assert_logits_close(our_logits(config, model, ids), our_logits(*load_model(source), ids))


def _rewrite_tensors(directory: Path, edit) -> None:
    path = directory / "model.safetensors"
    tensors = load_file(str(path))
    edit(tensors)
    save_file(tensors, str(path))


def test_missing_and_unexpected_tensors_are_named(tiny_dirs, tmp_path):
    directory = write_tiny_hf_model(tmp_path / "broken", vocab_size=VOCAB)
    _rewrite_tensors(directory, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(ValueError, match=r"missing tensors: model\.layers\.1\.mlp\.up_proj\.weight"):
        load_model(directory)
    _rewrite_tensors(directory, lambda t: t.update({
        "model.layers.1.mlp.up_proj.weight": torch.zeros(128, 64), "model.extra.weight": torch.zeros(2)}))
    with pytest.raises(ValueError, match=r"unexpected tensors: model\.extra\.weight"):
        load_model(directory)
    _rewrite_tensors(directory, lambda t: (t.pop("model.extra.weight"),
                                           t.update({"model.norm.weight": torch.ones(3)})))
    with pytest.raises(ValueError, match=r"model\.norm\.weight has shape \(3,\)"):
        load_model(directory)


def test_unknown_architecture_is_named(tiny_dirs, tmp_path):
    config = json.loads((tiny_dirs("llama") / "config.json").read_text())
    config.update(architectures=["GPT2LMHeadModel"], model_type="gpt2")
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"GPT2LMHeadModel.*supported:.*LlamaForCausalLM"):
        load_model(tmp_path)
    with pytest.raises(ValueError, match=r"'gpt2'.*supported: llama"):
        ModelConfig.from_gguf_fields({"general.architecture": "gpt2"}, {})
    with pytest.raises(FileNotFoundError):
        load_model(tmp_path / "nowhere")


def test_config_validation_names_the_problem():
    base = dict(architecture="LlamaForCausalLM", vocab_size=10, hidden_size=8, intermediate_size=16,
                num_hidden_layers=1, num_attention_heads=3, num_key_value_heads=2, head_dim=4)
    with pytest.raises(ValueError, match="num_attention_heads.*divisible"):
        ModelConfig(**base)
    with pytest.raises(ValueError, match="rope_scaling type 'yarn'"):
        ModelConfig(**dict(base, num_attention_heads=2, rope_scaling={"rope_type": "yarn"}))
    with pytest.raises(ValueError, match="vocab_size"):
        ModelConfig(**dict(base, num_attention_heads=2, vocab_size=0))


def test_kv_cache_rejects_positions_past_its_end(tiny_dirs):
    config, model = load_model(tiny_dirs("llama"))
    kv_cache = KVCache.allocate(config, 4, torch.float32, "cpu")
    with pytest.raises(ValueError, match="position 4 does not fit"):
        model(token_ids(n=5), torch.arange(5), kv_cache)


def test_bfloat16_weights_and_cache_stay_close_to_float32(tiny_dirs):
    directory, ids = tiny_dirs("qwen2"), token_ids()
    config, model = load_model(directory, dtype=torch.bfloat16)
    assert model.model.embed_tokens.weight.dtype == torch.bfloat16
    assert model.model.rotary_emb.inv_freq.dtype == torch.float32
    kv_cache = KVCache.allocate(config, 32, torch.bfloat16, "cpu")
    logits = model.compute_logits(model(ids, torch.arange(len(ids)), kv_cache)).float()
    reference = hf_logits(directory, ids)
    assert (logits - reference).abs().max() < 0.05 * reference.abs().max()


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("case", ["qwen2", "llama3-rope", "mistral-window-4"])
def test_cuda_matches_cpu(tiny_dirs, case):
    directory, ids = tiny_dirs(case), token_ids()
    config, model = load_model(directory, device="cuda")
    kv_cache = KVCache.allocate(config, 32, torch.float32, "cuda")
    logits, start = [], 0
    for size in INCREMENTAL:
        positions = torch.arange(start, start + size, device="cuda")
        logits.append(model.compute_logits(model(ids.cuda()[positions], positions, kv_cache)).cpu())
        start += size
    assert_logits_close(torch.cat(logits), hf_logits(directory, ids))
