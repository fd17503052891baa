"""Weight-only int8 / int4 layers: the quantizers, the layers against a float matmul of
the weights they stand for, and a quantized tiny model against its float32 self."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lmserve.backends.torch.factory import EngineConfig, build_engine
from lmserve.backends.torch.quantized_linear import (
    DENSE_ABOVE_ROWS,
    INT4_GROUP_SIZE,
    Int4Linear,
    Int8Linear,
    dequantize_int4,
    quantize_int4,
    quantize_int8,
    quantize_linear_layers,
)
from lmserve.core.types import EngineRequest, SamplingParams
from precision import engine_logits, perplexity, top1_agreement


def test_int8_codes_stay_within_half_a_step_of_the_weight():
    weight = torch.randn(40, 96, generator=torch.Generator().manual_seed(0))
    weight[3] = 0  # an all-zero row must not divide by zero
    codes, scales = quantize_int8(weight)
    assert codes.dtype == torch.int8 and codes.abs().max() <= 127
    error = (codes.float() * scales[:, None] - weight).abs()
    assert torch.all(error <= scales[:, None] / 2 + 1e-7)
    assert torch.all(codes[3] == 0)


def test_q4_1_blocks_quantize_back_to_their_own_codes():
    """A weight made of GGUF Q4_1 blocks (w = d * q + m) comes back bit for bit."""
    generator = torch.Generator().manual_seed(1)
    rows, blocks = 32, 4
    codes = torch.randint(0, 16, (rows, blocks, INT4_GROUP_SIZE), generator=generator)
    codes[..., 0], codes[..., 1] = 0, 15  # Q4_1 maps each block's minimum to 0, its maximum to 15
    d = torch.rand(rows, blocks, 1, generator=generator).half().float() + 0.01
    m = torch.randn(rows, blocks, 1, generator=generator).half().float()
    weight = (d * codes + m).reshape(rows, -1)
    got_codes, scales, zeros = quantize_int4(weight)
    assert torch.equal(got_codes, codes.reshape(rows, -1).int())
    torch.testing.assert_close(dequantize_int4(got_codes, scales, zeros), weight, rtol=0, atol=2e-6)


def test_a_constant_group_quantizes_exactly():
    weight = torch.full((16, 64), 0.25)
    codes, scales, zeros = quantize_int4(weight)
    assert torch.equal(dequantize_int4(codes, scales, zeros), weight)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("rows", [1, 7, 64])
def test_int8_layer_computes_the_matmul_of_its_codes(bias, rows):
    linear = nn.Linear(96, 48, bias=bias)
    x = torch.randn(rows, 96)
    codes, scales = quantize_int8(linear.weight.detach())
    expected = nn.functional.linear(x, codes.float() * scales[:, None], linear.bias)
    got = Int8Linear(linear)(x)
    assert got.dtype == x.dtype
    # bfloat16 activations inside the kernel: about 3 significant digits.
    torch.testing.assert_close(got, expected, rtol=2e-2, atol=2e-2 * expected.abs().max().item())


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("rows", [1, 7, 64])
def test_int4_layer_computes_the_matmul_of_its_codes(bias, rows):
    linear = nn.Linear(128, 48, bias=bias)
    x = torch.randn(3, rows, 128)  # leading axes are kept
    codes, scales, zeros = quantize_int4(linear.weight.detach())
    expected = nn.functional.linear(x, dequantize_int4(codes, scales, zeros), linear.bias)
    got = Int4Linear(linear)(x)
    assert got.shape == (3, rows, 48)
    torch.testing.assert_close(got, expected, rtol=2e-2, atol=2e-2 * expected.abs().max().item())


def test_int4_mode_keeps_lm_head_and_odd_shapes_in_int8():
    model = nn.Module()
    model.proj = nn.Linear(64, 32)
    model.odd = nn.Linear(64, 24)  # the int4 kernel wants outputs in multiples of 16
    model.lm_head = nn.Linear(64, 160)
    assert quantize_linear_layers(model, "int4") == 3
    assert isinstance(model.proj, Int4Linear)
    assert isinstance(model.odd, Int8Linear) and isinstance(model.lm_head, Int8Linear)


def test_an_unknown_method_is_refused():
    with pytest.raises(ValueError, match="--quantization must be one of int8, int4"):
        quantize_linear_layers(nn.Linear(4, 4), "int3")
    with pytest.raises(ValueError, match="--quantization must be one of"):
        EngineConfig(quantization="fp8")


@pytest.fixture(scope="module")
def tiny_text_ids():
    generator = torch.Generator().manual_seed(2)
    return torch.randint(3, 256, (200,), generator=generator).tolist()


@pytest.fixture(scope="module")
def tiny_float32_logits(tiny_model_dir, tiny_text_ids):
    return engine_logits(tiny_model_dir, tiny_text_ids, dtype="float32")


@pytest.mark.parametrize("quantization, min_agreement, max_perplexity_change", [
    ("int8", 0.95, 0.02), ("int4", 0.80, 0.10)])
def test_a_quantized_tiny_model_tracks_its_float32_self(tiny_model_dir, tiny_text_ids, tiny_float32_logits,
                                                      quantization, min_agreement, max_perplexity_change):
    """Its next-token choices and perplexity stay close to float32's."""
    logits = engine_logits(tiny_model_dir, tiny_text_ids, dtype="float32", quantization=quantization)
    agreement = top1_agreement(logits, tiny_float32_logits)
    reference = perplexity(tiny_float32_logits, tiny_text_ids)
    change = abs(perplexity(logits, tiny_text_ids) / reference - 1)
    assert agreement >= min_agreement, f"{quantization}: top-1 agreement {agreement:.3f}"
    assert change <= max_perplexity_change, f"{quantization}: perplexity off by {change:.2%}"


@pytest.mark.parametrize("quantization", ["int8", "int4"])
def test_the_engine_serves_with_quantized_weights(tiny_model_dir, quantization):
    engine = build_engine(tiny_model_dir, EngineConfig(device="cpu", dtype="float32", quantization=quantization,
                                                       cache_max_entry_count=16, cache_block_seq_len=16))
    layers = [type(m).__name__ for m in engine.runner.model.modules()]
    assert "Linear" not in layers and "PackedLinear" not in layers
    assert engine.runner.weights.startswith(f"{quantization} weights (--quantization {quantization}), "
                                            "float32 activations")
    engine.add_request(EngineRequest("q", (5, 6, 7, 8), SamplingParams(max_tokens=6, temperature=0.0,
                                                                        ignore_eos=True)))
    outputs = []
    while engine.has_work:
        outputs += engine.step()
    assert sum(len(o.new_token_ids) for o in outputs) == 6
    assert outputs[-1].finish_reason.value == "length"


def test_quantization_is_refused_on_cuda_before_any_weight_loads(tiny_model_dir, monkeypatch):
    from lmserve.backends.torch import factory

    monkeypatch.setattr(factory, "resolve_device", lambda name: torch.device("cuda"))
    monkeypatch.setattr(factory, "load_model", lambda *a, **k: pytest.fail("weights loaded"))
    with pytest.raises(ValueError, match="--quantization int4 runs on the CPU only"):
        factory.load_engine_model(tiny_model_dir, EngineConfig(quantization="int4"))


@pytest.mark.parametrize("types, expected", [
    ({"Q4_1"}, ("int4", "auto: the file's projections are Q4_1")),
    ({"Q4_0", "Q4_K"}, ("int4", "auto: the file's projections are Q4_0, Q4_K")),
    ({"Q4_K", "Q6_K"}, ("int8", "auto: the file's projections are Q4_K, Q6_K")),  # Q4_K_M: nothing loses bits
    ({"Q8_0"}, ("int8", "auto: the file's projections are Q8_0")),
    ({"F16"}, (None, "auto: the weights are not quantized")),
    ({"Q4_1", "F32"}, (None, "auto: the file's projections are F32, Q4_1, served dequantized")),
    ({"IQ2_XS"}, (None, "auto: the file's projections are IQ2_XS, served dequantized")),
])
def test_auto_keeps_a_quantized_files_precision(monkeypatch, types, expected):
    from lmserve.backends.torch import quantization_choice

    tensors = {"token_embd.weight": "Q8_0", "blk.0.attn_norm.weight": "F32"}
    for i, kind in enumerate(sorted(types)):
        tensors[f"blk.{i}.attn_q.weight"] = tensors[f"blk.{i}.ffn_down.weight"] = kind
    monkeypatch.setattr(quantization_choice, "gguf_tensor_types", lambda path: tensors)
    assert quantization_choice.choose_quantization("auto", "m.gguf", torch.device("cpu")) == expected


def test_auto_is_none_on_cuda_and_for_float_directories(tiny_model_dir):
    from lmserve.backends.torch.quantization_choice import choose_quantization

    assert choose_quantization("auto", tiny_model_dir, torch.device("cpu")) == (
        None, "auto: the weights are not quantized")
    assert choose_quantization("auto", tiny_model_dir, torch.device("cuda"))[0] is None
    assert choose_quantization("none", tiny_model_dir, torch.device("cpu")) == (None, "--quantization none")
    assert choose_quantization("int8", tiny_model_dir, torch.device("cpu")) == ("int8", "--quantization int8")
    assert EngineConfig(quantization=None).quantization == "none"  # the old spelling of none


@pytest.mark.parametrize("layer_type", [Int8Linear, Int4Linear])
def test_a_bias_is_kept_in_the_models_dtype(layer_type):
    """A bfloat16 model quantized from float32 weights (how the engine loads): outputs,
    bias included, come back in bfloat16 on both the kernel and the dense path."""
    linear = nn.Linear(64, 32, bias=True)
    layer = layer_type(linear, torch.bfloat16)
    assert layer.bias.dtype == torch.bfloat16
    if layer_type is Int8Linear:
        codes, scales = quantize_int8(linear.weight.detach())
        weight = codes.float() * scales[:, None]
    else:
        weight = dequantize_int4(*quantize_int4(linear.weight.detach()))
    for rows in (1, DENSE_ABOVE_ROWS + 1):
        x = torch.randn(rows, 64).to(torch.bfloat16)
        expected = nn.functional.linear(x.float(), weight, linear.bias)
        got = layer(x)
        assert got.dtype == torch.bfloat16
        torch.testing.assert_close(got.float(), expected, rtol=3e-2, atol=3e-2 * expected.abs().max().item())


def test_the_dense_copy_takes_over_above_the_row_limit_with_the_same_weights():
    linear = nn.Linear(128, 64)
    layer = Int4Linear(linear)
    x = torch.randn(DENSE_ABOVE_ROWS + 1, 128)
    row_by_row = torch.cat([layer(x[i : i + 1]) for i in range(len(x))])  # the int4 kernel
    torch.testing.assert_close(layer(x), row_by_row, rtol=2e-2, atol=2e-2 * row_by_row.abs().max().item())
