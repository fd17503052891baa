"""Tensor parallelism on the CPU (gloo): the split, and tiny models computing the same at tp 1, 2 and 4.

Each engine here spawns its ranks as processes, so every case costs a few seconds.
"""

from __future__ import annotations

import math
import queue

import pytest
import torch

from lmserve.backends.torch.factory import EngineConfig, create_backend
from lmserve.backends.torch.tensor_parallel import TensorParallel, WeightSlice, check_size, valid_sizes
from lmserve.core.types import EngineRequest, SamplingParams
from tiny_models import write_tiny_hf_model

PROMPTS = [(5, 17, 42, 99, 3), tuple(range(20, 60)), (9,) * 8]


# ---------------------------------------------------------------- the split


def test_valid_sizes_divide_the_heads_and_divide_or_share_the_kv_heads():
    assert valid_sizes(9, 3) == [1, 3, 9]  # SmolLM2-135M
    assert valid_sizes(4, 2) == [1, 2, 4]
    assert valid_sizes(32, 8) == [1, 2, 4, 8, 16, 32]
    assert valid_sizes(12, 4) == [1, 2, 4, 12]  # 3 and 6 would split a kv head's queries apart


def test_a_size_that_does_not_split_names_the_ones_that_do():
    check_size(3, 9, 3)
    with pytest.raises(ValueError, match=r"--tp 2 does not split .* 9 attention heads and 3 key/value heads.*"
                                         r"valid sizes: 1, 3, 9\."):
        check_size(2, 9, 3)
    with pytest.raises(ValueError, match="at least 1"):
        check_size(0, 9, 3)


def test_each_rank_holds_its_heads_and_the_kv_heads_they_read():
    assert [TensorParallel(r, 3).heads(9) for r in range(3)] == [(0, 3), (3, 3), (6, 3)]
    assert [TensorParallel(r, 3).kv_heads(3) for r in range(3)] == [(0, 1), (1, 1), (2, 1)]
    # More ranks than kv heads: ranks 0-2 share kv head 0, ranks 3-5 head 1 ...
    assert [TensorParallel(r, 9).kv_heads(3)[0] for r in range(9)] == [0, 0, 0, 1, 1, 1, 2, 2, 2]


def test_uneven_parts_cover_the_whole_and_padded_parts_are_equal():
    parts = [TensorParallel(r, 9).split(1536) for r in range(9)]
    assert parts[0][0] == 0 and sum(length for _, length in parts) == 1536
    assert all(a + n == b for (a, n), (b, _) in zip(parts, parts[1:]))
    assert {TensorParallel(r, 3).padded_split(100)[1] for r in range(3)} == {34}


def test_a_slice_past_the_end_is_padded_with_zeros():
    full = torch.arange(10.0).reshape(5, 2)
    assert torch.equal(WeightSlice(0, 3, 3).take(full), torch.tensor([[6.0, 7.0], [8.0, 9.0], [0.0, 0.0]]))
    assert torch.equal(WeightSlice(1, 1, 1).take(full), full[:, 1:])


def test_engine_config_checks_the_nodes():
    with pytest.raises(ValueError, match="--nnodes must divide --tp"):
        EngineConfig(tensor_parallel_size=3, nnodes=2)
    with pytest.raises(ValueError, match="--node-rank"):
        EngineConfig(tensor_parallel_size=2, nnodes=2, node_rank=2, master_port=1234)
    with pytest.raises(ValueError, match="--master-port"):
        EngineConfig(tensor_parallel_size=2, nnodes=2)


# ---------------------------------------------------------------- tiny engines


def run(model_dir, tp: int, requests: list[EngineRequest], **config) -> dict[str, list]:
    """Each request's outputs, from an engine split over ``tp`` ranks."""
    backend = create_backend(model_dir, EngineConfig(
        device="cpu", dtype="float32", cache_max_entry_count=64, cache_block_seq_len=16, enforce_eager=True,
        tensor_parallel_size=tp, **config))
    outputs: queue.SimpleQueue = queue.SimpleQueue()
    backend.start(lambda batch: [outputs.put(o) for o in batch])
    try:
        results: dict[str, list] = {}
        for request in requests:  # one at a time: a session's turns follow one another
            backend.submit(request)
            while True:
                out = outputs.get(timeout=60)
                results.setdefault(out.request_id, []).append(out)
                if out.finish_reason is not None:
                    assert out.error is None, out.error
                    break
        return results
    finally:
        backend.shutdown()


def tokens(outputs) -> list[int]:
    return [t for out in outputs for t in out.new_token_ids]


def logprob_values(outputs) -> list[float]:
    values = [record.logprob for record in outputs[0].prompt_logprobs[1:]]
    for out in outputs:
        values += [value for record in out.logprobs for _, value in record.top]
    return values


@pytest.fixture(scope="module")
def eight_head_model(tmp_path_factory):
    """A tiny model with 8 query heads and 4 key/value heads (head size 8)."""
    return write_tiny_hf_model(tmp_path_factory.mktemp("eight-heads"), num_attention_heads=8,
                               num_key_value_heads=4, seed=3)


@pytest.mark.parametrize("model, tp", [("four", 2), ("four", 4), ("eight", 2), ("eight", 4)])
def test_greedy_tokens_and_logprobs_match_one_rank(tiny_model_dir, eight_head_model, model, tp):
    model_dir = tiny_model_dir if model == "four" else eight_head_model
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True, logprobs=5, prompt_logprobs=3)
    requests = [EngineRequest(f"r{i}", prompt, params) for i, prompt in enumerate(PROMPTS)]
    single, split = run(model_dir, 1, requests), run(model_dir, tp, requests)
    for request in requests:
        assert tokens(split[request.request_id]) == tokens(single[request.request_id])
        expected, got = logprob_values(single[request.request_id]), logprob_values(split[request.request_id])
        assert len(got) == len(expected) > 30
        assert all(math.isclose(a, b, rel_tol=1e-4, abs_tol=1e-5) for a, b in zip(got, expected)), (got, expected)


def test_sessions_and_prefix_caching_work_split(tiny_model_dir):
    greedy = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    shared = tuple(range(40, 80))  # two and a half 16-token blocks
    requests = [
        EngineRequest("first", shared + (1, 2), greedy),
        EngineRequest("cached", shared + (3, 4), greedy),  # its first two blocks come from the cache
        EngineRequest("turn-1", (7, 8, 9), greedy, session_key="s", keep_kv=True),
    ]
    single = run(tiny_model_dir, 1, requests, enable_prefix_caching=True)
    turn_2 = (7, 8, 9, *tokens(single["turn-1"]), 10, 11)
    requests.append(EngineRequest("turn-2", turn_2, greedy, session_key="s", keep_kv=True))
    single = run(tiny_model_dir, 1, requests, enable_prefix_caching=True)
    split = run(tiny_model_dir, 2, requests, enable_prefix_caching=True)
    assert {k: tokens(v) for k, v in split.items()} == {k: tokens(v) for k, v in single.items()}
    assert split["cached"][-1].num_cached_tokens == 32
    assert split["turn-2"][-1].num_cached_tokens >= 3  # the session's kept turn


def test_a_dead_rank_makes_the_backend_unhealthy_and_reports_it_once(tiny_model_dir):
    import os
    import signal
    import time

    fatal: queue.SimpleQueue = queue.SimpleQueue()
    backend = create_backend(tiny_model_dir, EngineConfig(
        device="cpu", dtype="float32", cache_max_entry_count=64, cache_block_seq_len=16, enforce_eager=True,
        tensor_parallel_size=2), on_fatal=fatal.put)
    outputs: queue.SimpleQueue = queue.SimpleQueue()
    backend.start(lambda batch: [outputs.put(o) for o in batch])
    try:
        assert backend.is_healthy() and backend.failure is None
        (rank,) = backend.engine.runner.ranks.pids
        os.kill(rank, signal.SIGKILL)
        message = fatal.get(timeout=10)
        assert message == f"rank 1 (pid {rank}) exited with code -9"
        assert not backend.is_healthy() and backend.failure == message
        backend.submit(EngineRequest("late", (1, 2, 3), SamplingParams(max_tokens=4, temperature=0.0)))
        out = outputs.get(timeout=10)
        assert out.error is not None and "Tensor parallelism failed: rank 1" in out.error
        time.sleep(0.5)
        assert fatal.empty()  # reported once
    finally:
        backend.shutdown()
