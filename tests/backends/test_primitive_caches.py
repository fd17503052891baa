"""Matmul shapes come from a bounded set of buckets, and padding to them changes no result."""

import pytest
import torch

from lmserve.backends.torch.attention import grouped_attention
from lmserve.backends.torch.packed_linear import pack_weight, packed_linear, packing_supported
from lmserve.backends.torch.primitive_caches import EXACT_ROWS, bucket


def test_buckets_are_exact_up_to_64_then_at_most_one_eighth_more():
    assert [bucket(n) for n in (1, 7, 64)] == [1, 7, 64]
    assert [bucket(n) for n in (65, 72, 73, 129, 4096, 4097)] == [72, 72, 80, 144, 4096, 4608]
    sizes = range(1, 8193)
    assert all(n <= bucket(n) <= n * 1.125 for n in sizes)
    assert len({bucket(n) for n in sizes}) == EXACT_ROWS + 8 * 7  # 8 a power of two from 64 to 8192


@pytest.mark.skipif(not packing_supported(torch.float32), reason="this torch build cannot pack for oneDNN")
@pytest.mark.parametrize("rows", [3, 65, 100, 300])
def test_a_padded_packed_linear_equals_the_plain_one(rows):
    generator = torch.Generator().manual_seed(rows)
    weight, bias = torch.randn(48, 32, generator=generator), torch.randn(48, generator=generator)
    x = torch.randn(rows, 32, generator=generator)
    out = packed_linear(x, pack_weight(weight), bias)
    assert out.shape == (rows, 48)
    torch.testing.assert_close(out, torch.nn.functional.linear(x, weight, bias), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("query_len, key_len", [(5, 9), (70, 70), (100, 250)])
def test_bucketed_grouped_attention_ignores_the_padding(query_len, key_len):
    generator = torch.Generator().manual_seed(query_len)
    query = torch.randn(3, 2, query_len, 16, generator=generator)
    keys, values = (torch.randn(3, 1, key_len, 16, generator=generator) for _ in range(2))
    causal = torch.ones(query_len, key_len, dtype=torch.bool).tril(key_len - query_len)
    bias = torch.zeros(query_len, key_len).masked_fill_(~causal, float("-inf"))
    exact = grouped_attention(query, keys, values, bias)
    padded = grouped_attention(query, keys, values, bias, bucketed=True)
    assert padded.shape == exact.shape == (3, 2, query_len, 16)
    torch.testing.assert_close(padded, exact)
