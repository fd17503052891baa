"""Structured outputs' token masks in the sampling kernels: a constrained row draws only
allowed tokens, from the distribution of the allowed tokens alone, after bias and penalties;
free rows in the same batch draw what they would without any mask.

The CUDA twin runs the same masks under the simulator in test_sampling_kernels.py."""

from __future__ import annotations

from dataclasses import replace
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from lmserve.backends.torch.kernels.sampling import (
    SamplingBatch,
    apply_penalties_cpu,
    sample_cpu,
    sampling_probs_cpu,
)
from lmserve.backends.torch.sampler import allowed_tokens
from lmserve.core.types import SamplingParams

from test_sampling_kernels import Params, make_case, reference_penalties, reference_probs


def pack(allowed: np.ndarray) -> np.ndarray:
    """Boolean ``[M, V]`` to the kernels' int32 ``[M, ceil(V / 32)]`` (bit j of word w: token 32w + j)."""
    rows, vocab_size = allowed.shape
    padded = np.zeros((rows, (vocab_size + 31) // 32 * 32), bool)
    padded[:, :vocab_size] = allowed
    bits = padded.reshape(rows, -1, 32).astype(np.uint64) << np.arange(32, dtype=np.uint64)
    return bits.sum(axis=2).astype(np.uint32).view(np.int32)


def random_allowed(rng, rows: int, vocab_size: int, share: float = 0.3) -> np.ndarray:
    allowed = rng.random((rows, vocab_size)) < share
    allowed[:, 0] |= ~allowed.any(axis=1)  # at least one token each
    return allowed


def masked(logits: np.ndarray, allowed: np.ndarray) -> np.ndarray:
    return np.where(allowed, logits, np.float32(-np.inf)).astype(np.float32)


MASKED_PARAMS = [
    Params(temperature=0.0),
    Params(temperature=0.8, top_p=0.9, top_k=40, min_p=0.02, seed=1),
    Params(temperature=1.0, repetition_penalty=1.3, presence_penalty=0.5, frequency_penalty=0.2,
           logit_bias={2: 4.0, 5: -3.0}, seed=2),
    Params(temperature=0.0, repetition_penalty=0.5, logit_bias={7: 30.0}),
    Params(temperature=1.3, seed=3),
]


@pytest.mark.parametrize("vocab_size", [1000, 49152, 37])
def test_mask_then_penalties_match_the_reference(vocab_size):
    rng = np.random.default_rng(vocab_size)
    logits, prompts, outputs = make_case(rng, MASKED_PARAMS, vocab_size)
    allowed = random_allowed(rng, len(MASKED_PARAMS), vocab_size)
    batch = SamplingBatch.from_requests(MASKED_PARAMS, outputs, prompts, token_bitmask=pack(allowed),
                                        bitmask_rows=np.arange(len(MASKED_PARAMS), dtype=np.int32))
    expected = reference_penalties(masked(logits, allowed), MASKED_PARAMS, prompts, outputs)
    np.testing.assert_array_equal(apply_penalties_cpu(logits.copy(), batch), expected)
    probs = sampling_probs_cpu(logits.copy(), batch)
    for row, params in enumerate(MASKED_PARAMS):
        assert (probs[row][~allowed[row]] == 0).all()
        np.testing.assert_allclose(probs[row], reference_probs(expected[row], params), rtol=1e-5, atol=1e-9)


def test_a_biased_or_most_likely_forbidden_token_is_never_drawn():
    vocab_size = 300
    rng = np.random.default_rng(7)
    logits = (rng.standard_normal((2, vocab_size)) * 2).astype(np.float32)
    logits[:, 10] = 40.0  # by far the most likely, and forbidden
    allowed = np.zeros((2, vocab_size), bool)
    allowed[:, 100:140] = True
    params = [Params(temperature=0.0, logit_bias={11: 100.0}), Params(temperature=2.0, logit_bias={11: 100.0})]
    for seed in range(40):
        params[1] = replace(params[1], seed=seed)
        batch = SamplingBatch.from_requests(params, [[], []], token_bitmask=pack(allowed),
                                            bitmask_rows=np.array([0, 1], np.int32))
        tokens, logprobs = sample_cpu(logits.copy(), batch)
        assert ((tokens >= 100) & (tokens < 140)).all() and np.isfinite(logprobs).all()
        assert tokens[0] == 100 + int(np.argmax(logits[0, 100:140]))


def test_one_allowed_token_is_drawn_with_logprob_zero():
    logits = np.random.default_rng(1).standard_normal((2, 77)).astype(np.float32)
    allowed = np.zeros((1, 77), bool)
    allowed[0, 76] = True  # in the last, partial word
    params = [Params(temperature=0.0), Params(temperature=1.0, top_k=5, seed=4)]
    batch = SamplingBatch.from_requests(params, [[], []], token_bitmask=pack(allowed),
                                        bitmask_rows=np.array([0, 0], np.int32))
    tokens, logprobs = sample_cpu(logits.copy(), batch)
    assert tokens.tolist() == [76, 76]
    np.testing.assert_allclose(logprobs, 0.0, atol=1e-6)


def test_free_rows_draw_what_they_draw_without_masks_and_parallel_agrees():
    rng = np.random.default_rng(11)
    params = [Params(temperature=0.9, top_p=0.95, seed=i, frequency_penalty=0.1) for i in range(32)]
    logits, prompts, outputs = make_case(rng, params, 2000)
    allowed = random_allowed(rng, 16, 2000, share=0.05)
    rows = np.where(np.arange(32) % 2 == 0, np.arange(32) // 2, -1).astype(np.int32)
    batch = SamplingBatch.from_requests(params, outputs, prompts, token_bitmask=pack(allowed),
                                        bitmask_rows=rows)
    serial = sample_cpu(logits.copy(), batch, parallel=False)
    parallel = sample_cpu(torch.from_numpy(logits.copy()), batch, parallel=True)
    np.testing.assert_array_equal(parallel[0], serial[0])
    np.testing.assert_array_equal(parallel[1], serial[1])
    free, _ = sample_cpu(logits.copy(), SamplingBatch.from_requests(params, outputs, prompts))
    np.testing.assert_array_equal(serial[0][1::2], free[1::2])
    for row in range(0, 32, 2):
        assert allowed[row // 2, serial[0][row]]
    assert (serial[0][::2] != free[::2]).any()  # the masks did change the constrained rows


def test_masked_draws_follow_the_allowed_distribution():
    draws = 20_000
    row = (np.random.default_rng(3).standard_normal(64) * 1.5).astype(np.float32)
    allowed = np.zeros((1, 64), bool)
    allowed[0, [1, 5, 9, 33, 40, 63]] = True
    params = Params(temperature=1.0)
    batch = SamplingBatch.from_requests([params] * draws, [[]] * draws, seeds=list(range(draws)),
                                        token_bitmask=pack(allowed), bitmask_rows=np.zeros(draws, np.int32))
    tokens, _ = sample_cpu(np.tile(row, (draws, 1)), batch)
    expected = reference_probs(masked(row[None], allowed)[0], params)
    frequencies = np.bincount(tokens, minlength=64) / draws
    assert (frequencies[~allowed[0]] == 0).all()
    sigma = np.sqrt(expected * (1 - expected) / draws)
    assert (np.abs(frequencies - expected) <= 4.5 * sigma + 1e-12).all()


def test_uint32_masks_and_bits_past_the_vocabulary_are_accepted():
    logits = np.zeros((1, 40), np.float32)
    words = np.full((1, 2), 0xFFFF_FFFF, np.uint32)
    words[0, 0] = 0  # only tokens 32..39 (and bits past 40, ignored)
    batch = SamplingBatch.from_requests([Params(temperature=1.0, seed=9)], [[]], token_bitmask=words,
                                        bitmask_rows=np.zeros(1, np.int32))
    for seed in range(20):
        batch = replace(batch, seeds=np.array([seed], np.uint64))
        token = sample_cpu(logits.copy(), batch)[0][0]
        assert 32 <= token < 40


@pytest.mark.parametrize("mask, rows, message", [
    (np.zeros((1, 1), np.int32), np.array([0], np.int32), "needs 2 words"),
    (np.zeros((1, 2), np.int32), np.array([1], np.int32), "outside a mask of 1 rows"),
    (np.zeros((1, 2), np.int32), np.array([0, 0], np.int32), "bitmask_rows has shape"),
])
def test_bad_masks_are_refused_before_the_kernel_runs(mask, rows, message):
    batch = SamplingBatch.from_requests([Params()], [[]], token_bitmask=mask, bitmask_rows=rows)
    with pytest.raises(ValueError, match=message):
        sample_cpu(np.zeros((1, 40), np.float32), batch)


def test_mask_and_rows_come_together():
    with pytest.raises(ValueError, match="go together"):
        SamplingBatch.from_requests([Params()], [[]], token_bitmask=np.zeros((1, 2), np.int32))


def test_a_tiny_repetition_penalty_keeps_logits_finite():
    """LMDeploy accepts any penalty > 0; the batch clamps it so a division stays finite."""
    params = [SamplingParams(temperature=0.0, repetition_penalty=1e-40)]
    batch = SamplingBatch.from_requests(params, [[3]], [[4]])
    assert batch.repetition_penalty[0] > 0
    logits = np.full((1, 8), 0.5, np.float32)
    out = apply_penalties_cpu(logits, batch)
    assert np.isfinite(out).all() and out[0, 3] > 1e20


# ---- the sampler's masks from constraints -----------------------------------------------------


class FakeConstraint:
    """Allows the given tokens; ``accepting`` as given."""

    def __init__(self, tokens, accepting=False):
        self.tokens, self.accepting = tokens, accepting

    def fill_bitmask(self, row):
        allowed = np.zeros(row.size * 32, bool)
        allowed[list(self.tokens)] = True
        row[:] = pack(allowed[None])[0]

    def is_accepting(self):
        return self.accepting


def fake_seq(constraint=None, stop=()):
    return SimpleNamespace(request=SimpleNamespace(constraint=constraint), stop_token_ids=set(stop))


def unpack(words: np.ndarray, vocab_size: int) -> set[int]:
    bits = (words.view(np.uint32)[:, None] >> np.arange(32, dtype=np.uint32)) & 1
    return {int(t) for t in np.flatnonzero(bits.reshape(-1)) if t < vocab_size}


def test_allowed_tokens_builds_rows_only_for_constrained_sequences():
    assert allowed_tokens([fake_seq(), fake_seq()], 100) == (None, None)
    seqs = [fake_seq(), fake_seq(FakeConstraint({3, 64}), stop={99}), fake_seq(),
            fake_seq(FakeConstraint({5}, accepting=True), stop={99, 2})]
    bitmask, rows = allowed_tokens(seqs, 100)
    assert rows.tolist() == [-1, 0, -1, 1] and bitmask.shape == (2, 4)
    assert unpack(bitmask[0], 100) == {3, 64}  # not accepting: no way to stop yet
    assert unpack(bitmask[1], 100) == {5, 99, 2}  # accepting: the stop tokens too


def test_a_constraint_allowing_nothing_lets_the_sequence_stop():
    seqs = [fake_seq(FakeConstraint(set()), stop={7})]
    bitmask, _ = allowed_tokens(seqs, 50)
    assert unpack(bitmask[0], 50) == {7}


@pytest.mark.parametrize("repetition_penalty, allowed_logits, greedy", [
    (1e30, [-1e10, -1e9, -1e38], 5),  # every allowed logit overflows to -inf: all the lowest float32
    (1e300, [-2.0, 0.0, -1e38], 9),  # past float32's range: no 0 x inf
])
def test_a_penalty_that_overflows_leaves_the_allowed_tokens_drawable(repetition_penalty, allowed_logits, greedy):
    """A huge repetition penalty on every allowed token (all in the history) makes them the
    least likely, not impossible: the draw stays among them (a grammar would refuse any
    other), greedy takes the first highest, and no logprob is NaN."""
    logits = np.full((2, 64), 30.0, np.float32)
    logits[:, [5, 9, 33]] = allowed_logits
    allowed = np.zeros((1, 64), bool)
    allowed[0, [5, 9, 33]] = True
    params = [Params(temperature=0.0, repetition_penalty=repetition_penalty),
              Params(temperature=1.0, seed=3, repetition_penalty=repetition_penalty)]
    batch = SamplingBatch.from_requests(params, [[5, 9, 33]] * 2, [[33], [33]], token_bitmask=pack(allowed),
                                        bitmask_rows=np.zeros(2, np.int32))
    tokens, logprobs = sample_cpu(logits.copy(), batch)
    assert set(tokens.tolist()) <= {5, 9, 33} and np.isfinite(logprobs).all()
    assert tokens[0] == greedy
