"""The batched sampling kernels against a plain numpy reference.

The CUDA kernel runs under Numba's CUDA simulator in a subprocess (the
simulator is chosen when numba is first imported): this file doubles as that
subprocess's script.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from dataclasses import replace
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from lmserve.backends.torch.kernels.random import philox4x32_10, uniforms
from lmserve.backends.torch.kernels.sampling import (
    SamplingBatch,
    SamplingWorkspace,
    apply_penalties_cpu,
    sample_cpu,
    sampling_probs_cpu,
)
from lmserve.core.types import SamplingParams


def Params(temperature=1.0, top_p=1.0, top_k=0, seed=0, **fields) -> SamplingParams:  # noqa: N802
    return SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k, seed=seed, **fields)


# ---- the reference --------------------------------------------------------------------------


def reference_penalties(logits, params, prompts, outputs):
    """vLLM's order, with [B, V] masks and counts: bias, repetition, frequency, presence."""
    x = logits.copy()
    vocab_size = x.shape[1]
    for i, p in enumerate(params):
        for token, bias in p.logit_bias.items():
            x[i, token] += np.float32(bias)
        counts = np.bincount(np.asarray(outputs[i], np.int64), minlength=vocab_size)
        in_output = counts > 0
        seen = in_output.copy()
        seen[np.asarray(prompts[i], np.int64)] = True
        rep = np.where(seen, np.float32(p.repetition_penalty), np.float32(1.0))
        row = np.where(x[i] > 0, x[i] / rep, x[i] * rep)
        row = row - np.float32(p.frequency_penalty) * counts.astype(np.float32)
        row = row - np.float32(p.presence_penalty) * in_output.astype(np.float32)
        x[i] = row
    return x


def reference_order(row):
    """Token ids from most to least likely: by processed logit, descending, the lower id
    first among equal logits (the order greedy decoding breaks ties by)."""
    return np.lexsort((np.arange(row.size), -row.astype(np.float64)))


def reference_scaled_probs(row, p):
    """Unnormalised probabilities ``exp((x - max) / T)`` in float64 (1 for the most likely);
    0 where float32 holds no normal number (below ``exp(-87)``), as the kernels compute them."""
    scaled = ((row - row.max()) * (np.float32(1.0) / np.float32(p.temperature))).astype(np.float32)
    return np.where(scaled > -87.0, np.exp(scaled.astype(np.float64)), 0.0)


def reference_kept(row, p):
    """The kept set by sort, cumulative sum and cut: the first ``top_k`` of the order, then
    the shortest prefix of those whose mass reaches ``top_p`` of theirs, then those at least
    ``min_p`` times as likely as the most likely token; tokens of probability 0 never.

    Returns ``(kept ids, probabilities, margin)``: ``margin`` is how close (relative to the
    mass) a cut came to deciding otherwise; below float32's rounding the case is undecidable."""
    probs = reference_scaled_probs(row, p)
    order = reference_order(row)
    ordered = probs[order]
    length, margin = row.size, np.inf
    if 0 < p.top_k < row.size:
        length = p.top_k
    if p.top_p < 1:
        mass = ordered[:length].sum() if length < row.size else math.fsum(probs)
        cumulative = np.cumsum(ordered[:length])
        target = float(np.float32(p.top_p)) * mass
        nucleus = min(int(np.searchsorted(cumulative, target)) + 1, length)
        margin = min(margin, np.abs(cumulative[max(nucleus - 2, 0):nucleus + 1] - target).min() / mass)
        length = nucleus
    if p.min_p > 0:
        in_play = ordered[:length]
        length = min(length, int((in_play >= float(np.float32(p.min_p))).sum()))
        inexact = in_play[in_play != 1.0]  # the top token's ties: exactly 1 in any arithmetic
        if inexact.size:
            margin = min(margin, np.abs(inexact - float(np.float32(p.min_p))).min())
    kept = order[:length]
    return np.sort(kept[probs[kept] > 0]), probs, margin


def reference_probs(row, p):
    """The distribution one processed logits row is drawn from (float64)."""
    out = np.zeros(row.size)
    if p.temperature == 0:
        out[np.argmax(row)] = 1.0
        return out
    kept, probs, _ = reference_kept(row, p)
    out[kept] = probs[kept]
    return out / out.sum()


def reference_draw(row, p, u):
    """The token a uniform ``u`` draws: inverse CDF over the kept tokens in id order, and how
    close (relative to the kept mass) ``u`` came to drawing a neighbour."""
    kept, probs, margin = reference_kept(row, p)
    cumulative = np.cumsum(probs[kept])
    target = u * cumulative[-1]
    index = min(int(np.searchsorted(cumulative, target, side="right")), kept.size - 1)
    return int(kept[index]), min(margin, np.abs(cumulative - target).min() / cumulative[-1])


def make_case(rng, params, vocab_size, scale=2.0, history=6):
    size = len(params)
    logits = (rng.standard_normal((size, vocab_size)) * scale).astype(np.float32)
    prompts = [list(rng.integers(0, vocab_size, history)) for _ in range(size)]
    outputs = [list(rng.integers(0, vocab_size, history)) * 2 for _ in range(size)]  # repeats
    return logits, prompts, outputs


PENALTY_PARAMS = [
    Params(repetition_penalty=1.3),
    Params(presence_penalty=0.5, frequency_penalty=0.25),
    Params(repetition_penalty=0.8, presence_penalty=-0.3, frequency_penalty=0.1,
           logit_bias={3: 5.0, 4: -100.0}),
    Params(logit_bias={0: 1.5}),
    Params(),
]


def test_philox_matches_random123_known_answers():
    u = np.uint64
    assert philox4x32_10(u(0), u(0), u(0), u(0), u(0), u(0)) == (
        0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)
    ones = u(0xFFFF_FFFF)
    assert philox4x32_10(ones, ones, ones, ones, ones, ones) == (
        0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)


def test_uniforms_are_a_pure_function_of_seed_and_step():
    seeds = np.repeat(np.arange(100, dtype=np.uint64), 100)
    steps = np.tile(np.arange(100, dtype=np.uint64), 100)
    draws = uniforms(seeds, steps)
    np.testing.assert_array_equal(draws, uniforms(seeds, steps))
    assert len(np.unique(draws)) == draws.size
    assert 0.0 <= draws.min() and draws.max() < 1.0
    assert abs(draws.mean() - 0.5) < 0.01


def test_penalties_match_reference_exactly():
    rng = np.random.default_rng(0)
    logits, prompts, outputs = make_case(rng, PENALTY_PARAMS, 500)
    batch = SamplingBatch.from_requests(PENALTY_PARAMS, outputs, prompts)
    got = apply_penalties_cpu(logits.copy(), batch)
    np.testing.assert_array_equal(got, reference_penalties(logits, PENALTY_PARAMS, prompts, outputs))


def test_greedy_takes_the_lowest_id_among_ties_and_its_log_softmax():
    logits = np.zeros((2, 50), np.float32)
    logits[0, [7, 9, 30]] = 4.0
    logits[1, 5] = 3.0
    params = [Params(temperature=0.0, seed=1), Params(temperature=0.0, logit_bias={6: 3.5})]
    tokens, logprobs = sample_cpu(logits.copy(), SamplingBatch.from_requests(params, [[], []]))
    assert tokens.tolist() == [7, 6]
    expected = torch.log_softmax(torch.from_numpy(logits[0]), -1)[7]
    assert logprobs[0] == pytest.approx(float(expected), abs=1e-5)


KEPT_SET_PARAMS = [
    Params(temperature=0.7, top_p=0.9),
    Params(temperature=0.7, top_p=0.9, top_k=40),
    Params(temperature=1.0, top_k=5),
    Params(temperature=1.3, min_p=0.1),
    Params(temperature=0.5, top_k=1000, min_p=0.05),
    Params(temperature=1.0, top_k=50, top_p=0.5, min_p=0.2),
    Params(temperature=1.0),
    Params(temperature=0.9, top_p=0.999),
    Params(temperature=0.0),
]


@pytest.mark.parametrize("vocab_size, scale", [(1000, 2.0), (49152, 3.0)])
def test_kept_sets_match_reference(vocab_size, scale):
    rng = np.random.default_rng(vocab_size)
    logits, prompts, outputs = make_case(rng, KEPT_SET_PARAMS, vocab_size, scale)
    params = [replace(penalties, temperature=k.temperature, top_p=k.top_p, top_k=k.top_k,
                      min_p=k.min_p) for k, penalties in zip(KEPT_SET_PARAMS, PENALTY_PARAMS * 2)]
    batch = SamplingBatch.from_requests(params, outputs, prompts)
    processed = reference_penalties(logits, params, prompts, outputs)
    got = sampling_probs_cpu(logits.copy(), batch)
    for i, p in enumerate(params):
        expected = reference_probs(processed[i], p)
        np.testing.assert_array_equal(got[i] > 0, expected > 0, err_msg=f"row {i}: {p}")
        np.testing.assert_allclose(got[i], expected, rtol=1e-5, atol=1e-9, err_msg=f"row {i}")
    tokens, logprobs = sample_cpu(logits.copy(), batch)
    for i, p in enumerate(params):
        expected = reference_probs(processed[i], p if p.temperature else replace(p, temperature=1))
        assert got[i, tokens[i]] > 0
        assert logprobs[i] == pytest.approx(np.log(expected[tokens[i]]), abs=1e-5)


@pytest.mark.parametrize("params", [
    Params(temperature=1.0, top_k=4999),  # no level holds the top-k: all tokens are candidates
    Params(temperature=1.0, top_p=0.9999),
])
def test_kept_sets_when_every_token_is_a_candidate(params):
    logits = (np.random.default_rng(1).standard_normal((1, 5000)) * 6).astype(np.float32)
    got = sampling_probs_cpu(logits.copy(), SamplingBatch.from_requests([params], [[]]))
    expected = reference_probs(logits[0], params)
    np.testing.assert_array_equal(got[0] > 0, expected > 0)
    np.testing.assert_allclose(got[0], expected, rtol=1e-5, atol=1e-9)


def test_masked_tokens_are_never_drawn():
    logits = (np.random.default_rng(5).standard_normal((3, 100)) * 2).astype(np.float32)
    logits[:, 1::2] = -np.inf  # e.g. padded vocabulary entries
    logits[0, 1] = 50.0  # ... except one of them, in one row
    params = [Params(temperature=0.0), Params(1.5, seed=1), Params(1.0, top_p=0.95, seed=2)]
    for seed in range(50):
        params[1:] = [replace(p, seed=seed) for p in params[1:]]
        tokens, logprobs = sample_cpu(logits.copy(), SamplingBatch.from_requests(params, [[]] * 3))
        assert tokens[0] == 1 and (tokens[1:] % 2 == 0).all() and np.isfinite(logprobs).all()
    assert sample_cpu(np.empty((0, 100), np.float32), SamplingBatch.from_requests([], []))[0].size == 0


def test_a_seed_and_step_give_the_same_token_whatever_the_batch():
    rng = np.random.default_rng(2)
    params = [Params(temperature=1.0, seed=seed) for seed in range(12)]
    params[3] = Params(temperature=0.8, top_p=0.9, top_k=30, seed=3, presence_penalty=0.5)
    logits, prompts, outputs = make_case(rng, params, 3000)
    batch = SamplingBatch.from_requests(params, outputs, prompts)
    tokens, logprobs = sample_cpu(logits.copy(), batch)
    again, _ = sample_cpu(logits.copy(), batch)
    np.testing.assert_array_equal(tokens, again)
    for order in (np.arange(12)[::-1], rng.permutation(12)):
        shuffled = SamplingBatch.from_requests([params[i] for i in order],
                                               [outputs[i] for i in order],
                                               [prompts[i] for i in order])
        got, got_logprobs = sample_cpu(logits[order].copy(), shuffled)
        np.testing.assert_array_equal(got, tokens[order])
        np.testing.assert_array_equal(got_logprobs, logprobs[order])
    alone, _ = sample_cpu(logits[3:4].copy(), SamplingBatch.from_requests(
        params[3:4], outputs[3:4], prompts[3:4]))
    assert alone[0] == tokens[3]
    # the step moves the draw: a longer output is a different counter
    later, _ = sample_cpu(logits.copy(), SamplingBatch.from_requests(
        params, [o + [0] for o in outputs], prompts))
    assert (later != tokens).any()


@pytest.mark.parametrize("params", [
    Params(temperature=0.9, top_k=25, top_p=0.95, min_p=0.01),
    Params(temperature=1.0),
])
def test_draws_follow_the_reference_distribution(params):
    draws = 40_000
    row = (np.random.default_rng(3).standard_normal(40) * 1.5).astype(np.float32)
    expected = reference_probs(row, params)
    batch = SamplingBatch.from_requests([params] * draws, [[]] * draws, seeds=list(range(draws)))
    tokens, logprobs = sample_cpu(np.tile(row, (draws, 1)), batch)
    frequencies = np.bincount(tokens, minlength=row.size) / draws
    assert (frequencies[expected == 0] == 0).all()
    sigma = np.sqrt(expected * (1 - expected) / draws)
    assert (np.abs(frequencies - expected) <= 4.5 * sigma + 1e-12).all()
    kept = expected > 0
    chi2 = (draws * (frequencies[kept] - expected[kept]) ** 2 / expected[kept]).sum()
    df = kept.sum() - 1
    assert chi2 < df + 6 * np.sqrt(2 * df)
    np.testing.assert_allclose(logprobs, np.log(expected[tokens]), atol=1e-5)


def test_parallel_and_serial_rows_agree_and_torch_tensors_are_accepted():
    rng = np.random.default_rng(4)
    params = [Params(temperature=0.8, top_p=0.9, seed=i, frequency_penalty=0.2) for i in range(32)]
    logits, prompts, outputs = make_case(rng, params, 2000)
    batch = SamplingBatch.from_requests(params, outputs, prompts)
    workspace = SamplingWorkspace()
    serial = sample_cpu(logits.copy(), batch, workspace, parallel=False)
    parallel = sample_cpu(logits.copy(), batch, workspace, parallel=True)
    tensor = sample_cpu(torch.from_numpy(logits.copy()), batch, workspace)
    for got in (parallel, tensor):
        np.testing.assert_array_equal(got[0], serial[0])
        np.testing.assert_array_equal(got[1], serial[1])


def test_builder_reads_sampling_params():
    params = [SamplingParams(temperature=0.0, seed=5), SamplingParams(top_k=1, seed=None),
              SamplingParams(temperature=0.7, top_p=0.9, top_k=20, seed=-1),
              SamplingParams(temperature=0.5, seed=7, frequency_penalty=0.5,
                             logit_bias={2: 1.0, 9: -1.0})]
    batch = SamplingBatch.from_requests(params, [[1], [2, 3], [], [4, 4]], [[9], [8], [7], [6]],
                                        seeds=[None, 11, None, None])
    assert batch.temperature.tolist() == [0.0, 0.0, pytest.approx(0.7), 0.5]
    assert batch.seeds.tolist()[0] == 5 and batch.seeds.tolist()[1] == 11
    assert batch.seeds[2] == 2**64 - 1
    assert batch.steps.tolist() == [1, 2, 0, 2]
    # only the penalised row keeps a history, and only its output (no repetition penalty)
    assert batch.token_offsets.tolist() == [0, 0, 0, 0, 2]
    assert batch.token_ids.tolist() == [4, 4] and batch.num_prompt_tokens.tolist() == [0] * 4
    assert batch.bias_offsets.tolist() == [0, 0, 0, 0, 2]
    assert dict(zip(batch.bias_token_ids.tolist(), batch.bias_values.tolist())) == {2: 1.0, 9: -1.0}


# ---- the CUDA kernel -------------------------------------------------------------------------

SIMULATOR_CASES = [
    # (vocab, threads, params): small, the simulator runs every thread in Python
    (200, 4, [Params(temperature=0.0), Params(0.7, 0.9, seed=2),
              Params(1.0, top_k=20, min_p=0.05, seed=3),
              Params(0.8, 0.8, 10, 4, repetition_penalty=1.3, presence_penalty=0.4,
                     frequency_penalty=0.2, logit_bias={5: 3.0, 7: -2.0}),
              Params(1.2, seed=5),
              Params(temperature=0.0, repetition_penalty=1.5, logit_bias={3: 10.0})]),
    (131, 8, [Params(0.3, top_k=130, seed=6), Params(1.0, top_p=0.9999, seed=7),
               Params(0.6, top_k=3, top_p=0.5, seed=8)]),
]


def simulator_results() -> list[dict]:
    """CPU and CUDA (whatever numba was imported as) results on SIMULATOR_CASES."""
    from numba import cuda

    from lmserve.backends.torch.kernels.sampling import sample_cuda

    results = []
    for case, (vocab_size, threads, params) in enumerate(SIMULATOR_CASES):
        rng = np.random.default_rng(case)
        logits, prompts, outputs = make_case(rng, params, vocab_size, scale=2.5)
        logits[:, -5:] = -np.inf  # masked tokens
        # every other row under a structured output's token mask (the vocabularies are
        # not multiples of 32: the last word is partial)
        words = (vocab_size + 31) // 32
        bitmask = rng.integers(-2**31, 2**31, (len(params), words), dtype=np.int64).astype(np.int32)
        bitmask_rows = np.where(np.arange(len(params)) % 2 == 1, np.arange(len(params)), -1).astype(np.int32)
        batch = SamplingBatch.from_requests(params, outputs, prompts, token_bitmask=bitmask,
                                            bitmask_rows=bitmask_rows)
        cpu_tokens, cpu_logprobs = sample_cpu(logits.copy(), batch)
        gpu_tokens, gpu_logprobs = sample_cuda(cuda.to_device(logits.copy()), batch, threads=threads)
        results.append({"cpu": [cpu_tokens.tolist(), cpu_logprobs.tolist()],
                        "cuda": [gpu_tokens.tolist(), gpu_logprobs.tolist()]})
    return results


def check_results(results):
    for result in results:
        assert result["cuda"][0] == result["cpu"][0]
        np.testing.assert_allclose(result["cuda"][1], result["cpu"][1], atol=1e-5)


def test_cuda_kernel_matches_cpu_under_the_simulator():
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="1")
    run = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    check_results(json.loads(run.stdout.strip().splitlines()[-1]))


def nvvm_available() -> bool:
    from numba.cuda.cudadrv import nvvm

    try:
        return nvvm.is_available()
    except Exception:  # noqa: BLE001 - any failure to load the toolkit means "no"
        return False


@pytest.mark.skipif(torch.cuda.is_available() or not nvvm_available(),
                    reason="needs the CUDA toolkit's NVVM and no GPU (the GPU test covers it)")
def test_cuda_kernel_compiles_for_a_gpu(monkeypatch):
    """The simulator runs the kernel as Python; NVVM compiles it as a GPU would."""
    import numba
    from numba import cuda

    from lmserve.backends.torch.kernels import sampling_cuda

    # compiling device functions asks the (absent) driver for the compute capability
    monkeypatch.setattr(numba.cuda.dispatcher, "get_current_device",
                        lambda: SimpleNamespace(compute_capability=(8, 0)))
    batch = SamplingBatch.from_requests([SamplingParams()], [[]])
    scratch = np.zeros((1, 8), np.float32)
    keys = scratch.view(np.int32)
    args = sampling_cuda._cuda_kernel_args(scratch, batch.kernel_args(), keys, scratch, scratch, keys, keys,
                                           np.zeros(1, np.int64), np.zeros(1, np.float32))
    ptx, _ = cuda.compile_ptx(sampling_cuda._sample_kernel.py_func,
                              tuple(numba.typeof(a) for a in args), cc=(8, 0))
    assert ".entry" in ptx


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_kernel_matches_cpu_on_a_gpu():
    from lmserve.backends.torch.kernels.sampling import sample_cuda

    check_results(simulator_results())
    rng = np.random.default_rng(9)
    params = [replace(p, seed=i) for i, p in enumerate(KEPT_SET_PARAMS * 8)]
    logits, prompts, outputs = make_case(rng, params, 49152, scale=3.0)
    batch = SamplingBatch.from_requests(params, outputs, prompts)
    cpu = sample_cpu(logits.copy(), batch)
    gpu = sample_cuda(torch.from_numpy(logits).cuda(), batch)
    np.testing.assert_array_equal(gpu[0], cpu[0])
    np.testing.assert_allclose(gpu[1], cpu[1], atol=1e-5)


if __name__ == "__main__":
    print(json.dumps(simulator_results()))
