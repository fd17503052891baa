"""Pre-packed CPU linear layers compute what the ``nn.Linear`` they replace computes."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lmserve.backends.torch import packed_linear
from lmserve.backends.torch.packed_linear import PackedLinear, pack_linear_layers, packing_supported
from lmserve.backends.torch.weights import load_model
from tests.reference_kv_cache import KVCache

needs_packing = pytest.mark.skipif(not packing_supported(torch.float32), reason="this torch build cannot pack")


@needs_packing
@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("rows", [1, 7, 64, 300])
def test_packed_layer_equals_the_linear_it_replaces(dtype, tolerance, bias, rows):
    if not packing_supported(dtype):  # bf16 packing needs AVX512-BW or AVX-NE-CONVERT
        pytest.skip(f"this CPU cannot pack {dtype}")
    torch.manual_seed(rows)
    linear = nn.Linear(48, 80, bias=bias).to(dtype)
    packed = PackedLinear(linear)
    x = torch.randn(rows, 48).to(dtype)
    with torch.inference_mode():
        expected, got = linear(x).float(), packed(x).float()
    assert got.shape == (rows, 80)
    torch.testing.assert_close(got, expected, rtol=tolerance, atol=tolerance)


@needs_packing
def test_the_engines_model_is_packed_and_keeps_its_outputs(tiny_model_dir):
    """Every projection and the tied output layer are packed; the embedding keeps
    its weight; the model's hidden states and logits stay the same."""
    _, model = load_model(tiny_model_dir)
    model.fuse_projections()
    _, reference = load_model(tiny_model_dir)
    reference.fuse_projections()
    linears = sum(type(m) is nn.Linear for m in model.modules())
    embedding = model.model.embed_tokens.weight

    assert pack_linear_layers(model) == linears
    assert not any(type(m) is nn.Linear for m in model.modules())
    assert isinstance(model.lm_head, PackedLinear)
    assert model.model.embed_tokens.weight is embedding

    ids = torch.tensor([5, 17, 42, 99, 3, 64, 7])
    with torch.inference_mode():
        outputs = []
        for m in (model, reference):
            cache = KVCache.allocate(m.config, 64, dtype=torch.float32, device="cpu")
            hidden = m(ids, torch.arange(len(ids)), cache)
            outputs.append(m.compute_logits(hidden))
    torch.testing.assert_close(outputs[0], outputs[1], rtol=1e-4, atol=1e-4)


def test_without_packing_support_nothing_is_replaced(monkeypatch):
    monkeypatch.setattr(packed_linear, "packing_supported", lambda dtype: False)
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    assert pack_linear_layers(model) == 0
    assert [type(m) for m in model] == [nn.Linear, nn.ReLU, nn.Linear]


def test_layers_off_the_cpu_are_left_alone():
    model = nn.Sequential(nn.Linear(4, 4, device="meta"))
    assert pack_linear_layers(model) == 0
    assert type(model[0]) is nn.Linear
