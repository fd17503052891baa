"""Long prefill chunks attend through ``batched_sdpa`` (torch's fused kernel) and get
what plain softmax attention gives, causal or masked, grouped heads or not."""

from __future__ import annotations

import pytest
import torch

from lmserve.backends.torch.attention import batched_sdpa


def _reference(query, keys, values, allowed):
    """float64 softmax attention with the kv heads repeated; ``allowed`` [T, S] bool."""
    group = query.shape[0] // keys.shape[0]
    keys = keys.double().repeat_interleave(group, 0)
    values = values.double().repeat_interleave(group, 0)
    scores = query.double() @ keys.transpose(-1, -2) * query.shape[-1] ** -0.5
    scores = scores.masked_fill(~allowed, float("-inf"))
    return scores.softmax(-1) @ values


@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("heads, kv_heads", [(9, 3), (4, 4)])
def test_causal_chunk_equals_softmax_attention(dtype, tolerance, heads, kv_heads):
    torch.manual_seed(heads)
    query, keys, values = (torch.randn(h, 300, 32).to(dtype) for h in (heads, kv_heads, kv_heads))
    got = batched_sdpa(query, keys, values, mask=None, is_causal=True)
    allowed = torch.ones(300, 300, dtype=torch.bool).tril()
    assert got.shape == (heads, 300, 32) and got.dtype == dtype
    torch.testing.assert_close(got.double(), _reference(query, keys, values, allowed), rtol=tolerance, atol=tolerance)


@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_a_chunk_after_cached_context_follows_its_mask(dtype, tolerance):
    torch.manual_seed(0)
    length, context = 200, 500  # the chunk's 200 queries come after 300 cached tokens
    query = torch.randn(9, length, 32).to(dtype)
    keys, values = torch.randn(3, context, 32).to(dtype), torch.randn(3, context, 32).to(dtype)
    allowed = torch.ones(length, context, dtype=torch.bool).tril(context - length)
    got = batched_sdpa(query, keys, values, mask=allowed, is_causal=False)
    torch.testing.assert_close(got.double(), _reference(query, keys, values, allowed), rtol=tolerance, atol=tolerance)
