"""The in-place decode attention kernel against plain softmax attention in float64."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lmserve.backends.torch.kernels.attention import decode_attention, store_and_decode_attention

BLOCK_SIZE, HEAD_DIM, BLOCKS_PER_HEAD = 8, 16, 20


def bf16_bits(array: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bits (as uint16), rounded the way torch rounds."""
    return torch.from_numpy(array).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)


def widened(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint32) << 16).view(np.float32)


def random_case(rng, context_lens, kv_heads, group):
    """Caches, block tables (distinct shuffled blocks per sequence) and queries."""
    shape = (kv_heads * BLOCKS_PER_HEAD, BLOCK_SIZE, HEAD_DIM)
    keys, values = (rng.standard_normal(shape).astype(np.float32) * 2 for _ in range(2))
    needed = [-(-n // BLOCK_SIZE) for n in context_lens]
    tables = np.full((len(context_lens), max(needed) + 1), BLOCKS_PER_HEAD - 1, np.int64)  # padding: any block
    blocks = rng.permutation(BLOCKS_PER_HEAD - 1)[: sum(needed)]
    start = 0
    for i, n in enumerate(needed):
        tables[i, :n] = blocks[start : start + n]
        start += n
    query = rng.standard_normal((len(context_lens), kv_heads, group, HEAD_DIM)).astype(np.float32)
    return keys, values, tables, np.asarray(context_lens, np.int64), query


def reference(query, keys, values, tables, context_lens, window=0):
    """softmax(q k^T / sqrt(d)) v over each sequence's gathered context, float64."""
    _, kv_heads, _, head_dim = query.shape
    out = np.empty(query.shape, np.float64)
    for i, n in enumerate(context_lens):
        positions = np.arange(n)
        for h in range(kv_heads):
            rows = h * BLOCKS_PER_HEAD + tables[i, positions // BLOCK_SIZE]
            k = keys[rows, positions % BLOCK_SIZE].astype(np.float64)
            v = values[rows, positions % BLOCK_SIZE].astype(np.float64)
            if window:
                k, v = k[max(0, n - window):], v[max(0, n - window):]
            scores = query[i, h].astype(np.float64) @ k.T / np.sqrt(head_dim)
            weights = np.exp(scores - scores.max(-1, keepdims=True))
            out[i, h] = (weights / weights.sum(-1, keepdims=True)) @ v
    return out


# One token, a partial block, exactly one block, block boundaries +- 1, several blocks.
CONTEXT_LENS = [1, 5, BLOCK_SIZE, BLOCK_SIZE + 1, 2 * BLOCK_SIZE - 1, 5 * BLOCK_SIZE + 3]


@pytest.mark.parametrize("kv_heads, group", [(1, 1), (2, 3), (3, 4)])
def test_float32_cache_matches_softmax_attention(kv_heads, group):
    rng = np.random.default_rng(kv_heads * 10 + group)
    keys, values, tables, context_lens, query = random_case(rng, CONTEXT_LENS, kv_heads, group)
    out = np.full_like(query, np.nan)
    decode_attention(query, keys, values, tables, context_lens, out)
    np.testing.assert_allclose(out, reference(query, keys, values, tables, context_lens), rtol=1e-4, atol=1e-5)


def test_bfloat16_cache_is_read_as_its_bits():
    """A uint16 cache holds bfloat16 bits: the result is attention over those
    (rounded) values, computed in float32."""
    rng = np.random.default_rng(7)
    keys, values, tables, context_lens, query = random_case(rng, CONTEXT_LENS, 3, 3)
    key_bits, value_bits = bf16_bits(keys), bf16_bits(values)
    out = np.empty_like(query)
    decode_attention(query, key_bits, value_bits, tables, context_lens, out)
    expected = reference(query, widened(key_bits), widened(value_bits), tables, context_lens)
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("window", [1, 3, BLOCK_SIZE, BLOCK_SIZE + 2, 1000])
def test_sliding_window_attends_to_the_last_positions_only(window):
    rng = np.random.default_rng(window)
    keys, values, tables, context_lens, query = random_case(rng, CONTEXT_LENS, 2, 2)
    out = np.empty_like(query)
    decode_attention(query, keys, values, tables, context_lens, out, window=window)
    expected = reference(query, keys, values, tables, context_lens, window=window)
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-5)


def test_positions_past_the_context_are_never_read():
    """Whatever lies in the rest of a sequence's last block, or in blocks its
    table does not reach, cannot change the result (here: NaN)."""
    rng = np.random.default_rng(3)
    keys, values, tables, context_lens, query = random_case(rng, [3, BLOCK_SIZE + 2], 1, 2)
    expected = np.empty_like(query)
    decode_attention(query, keys, values, tables, context_lens, expected)
    for i, n in enumerate(context_lens):
        last = tables[i, (n - 1) // BLOCK_SIZE]
        keys[last, (n - 1) % BLOCK_SIZE + 1 :] = np.nan
        values[last, (n - 1) % BLOCK_SIZE + 1 :] = np.nan
        keys[tables[i, -1]] = values[tables[i, -1]] = np.nan  # the padding entry
    out = np.empty_like(query)
    decode_attention(query, keys, values, tables, context_lens, out)
    np.testing.assert_array_equal(out, expected)


def test_huge_scores_stay_finite():
    """The running softmax rescales: scores far apart neither overflow nor vanish."""
    rng = np.random.default_rng(5)
    keys, values, tables, context_lens, query = random_case(rng, [3 * BLOCK_SIZE], 1, 1)
    keys *= 40.0
    out = np.empty_like(query)
    decode_attention(query, keys, values, tables, context_lens, out)
    assert np.isfinite(out).all()
    np.testing.assert_allclose(out, reference(query, keys, values, tables, context_lens), rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("change, message", [
    (lambda a: a.update(keys=a["keys"].astype(np.float64)), "float32 or uint16"),
    (lambda a: a.update(values=bf16_bits(a["values"])), "float32 or uint16"),
    (lambda a: a.update(query=a["query"].astype(np.float64)), "float32"),
    (lambda a: a.update(context_lens=np.array([0, 4])), ">= 1"),
    (lambda a: a.update(context_lens=np.array([4])), "one context length"),
    (lambda a: a.update(tables=a["tables"][:, :1]), "shorter than its context"),
])
def test_bad_arguments_are_refused_before_the_kernel_runs(change, message):
    rng = np.random.default_rng(0)
    keys, values, tables, context_lens, query = random_case(rng, [4, BLOCK_SIZE + 4], 2, 2)
    args = dict(query=query, keys=keys, values=values, tables=tables, context_lens=context_lens)
    change(args)
    with pytest.raises((TypeError, ValueError), match=message):
        decode_attention(args["query"], args["keys"], args["values"], args["tables"], args["context_lens"],
                         np.empty(args["query"].shape, np.float32))


@pytest.mark.parametrize("bfloat16", [False, True])
def test_storing_first_writes_each_new_token_where_its_context_reads_it(bfloat16):
    """store_and_decode_attention writes every sequence's new key/value at its row, then
    attends over contexts that end with them; the query may be bfloat16 bits too."""
    rng = np.random.default_rng(11)
    kv_heads, group = 3, 3
    keys, values, tables, context_lens, query = random_case(rng, CONTEXT_LENS, kv_heads, group)
    num_seqs = len(CONTEXT_LENS)
    new_keys, new_values = (rng.standard_normal((num_seqs, kv_heads, HEAD_DIM)).astype(np.float32) for _ in range(2))
    last = context_lens - 1  # each new token is its context's last position
    slots = tables[np.arange(num_seqs), last // BLOCK_SIZE] * BLOCK_SIZE + last % BLOCK_SIZE
    write_rows = (np.arange(kv_heads)[:, None] * BLOCKS_PER_HEAD * BLOCK_SIZE + slots[None, :]).reshape(-1)
    if bfloat16:
        keys, values, new_keys, new_values = (bf16_bits(a) for a in (keys, values, new_keys, new_values))
        query = bf16_bits(query)
    expected_keys, expected_values = keys.copy(), values.copy()
    for cache, new in ((expected_keys, new_keys), (expected_values, new_values)):
        flat = cache.reshape(-1, HEAD_DIM)
        for h in range(kv_heads):
            flat[write_rows[h * num_seqs : (h + 1) * num_seqs]] = new[:, h]
    out = np.full(query.shape, np.nan, np.float32)
    store_and_decode_attention(query, new_keys, new_values, write_rows, keys, values, tables, context_lens, out)
    np.testing.assert_array_equal(keys, expected_keys)
    np.testing.assert_array_equal(values, expected_values)
    as_float = widened if bfloat16 else (lambda a: a)
    expected = reference(as_float(query), as_float(expected_keys), as_float(expected_values), tables, context_lens)
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-5)
