"""The compiled decode step computes what the eager step computes, writes the
cache in place, and serves new batch sizes and contexts without compiling again."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from lmserve.backends.torch.attention import DecodeTables
from lmserve.backends.torch.model_runner import ModelRunner
from lmserve.backends.torch.paged_cache import PagedKVCache
from lmserve.backends.torch.sequence import Sequence
from lmserve.backends.torch.weights import load_model
from lmserve.core.types import EngineRequest, SamplingParams

BLOCK_SIZE, NUM_BLOCKS = 4, 40
PROMPTS = [(5, 17, 42, 99, 3), (7, 8), tuple(range(20, 33)), (9,) * 8]
STEPS = 6


def greedy_decodes(runner: ModelRunner, prompts, steps: int = STEPS) -> list[torch.Tensor]:
    """Prefill each prompt, then ``steps`` batched greedy decodes of all of them
    (the first token after each prompt is fixed); each decode step's logits."""
    free = list(reversed(range(NUM_BLOCKS)))  # handed out back to front: tables are not sorted
    sequences = []
    for i, prompt in enumerate(prompts):
        seq = Sequence(EngineRequest(f"r{i}", prompt, SamplingParams(max_tokens=steps + 1)), i)
        seq.block_table = [free.pop() for _ in range(-(-(len(prompt) + steps + 1) // BLOCK_SIZE))]
        runner.run([(seq, len(prompt))], [0], fresh_blocks=seq.block_table)
        seq.num_computed_tokens = len(prompt)
        seq.token_ids.append(11 + i)
        sequences.append(seq)
    all_logits = []
    for _ in range(steps):
        scheduled = [(seq, 1) for seq in sequences]
        _, _, metadata, _ = runner.prepare(scheduled)
        assert isinstance(metadata, DecodeTables)  # the compiled step's kind of step
        logits, _ = runner.run(scheduled, list(range(len(sequences))))
        all_logits.append(logits)
        for seq, token in zip(sequences, logits.argmax(-1).tolist()):
            seq.num_computed_tokens += 1
            seq.token_ids.append(token)
    return all_logits


def make_runner(model, config, dtype, compiled: bool, sliding_window=None) -> ModelRunner:
    cache = PagedKVCache.allocate(dataclasses.replace(config, sliding_window=sliding_window), NUM_BLOCKS,
                                  BLOCK_SIZE, dtype, "cpu")
    return ModelRunner(model, cache, torch.device("cpu"), compile_decodes=compiled)


@pytest.fixture(scope="module")
def fused_model(tiny_model_dir):
    config, model = load_model(tiny_model_dir, dtype=torch.float32)
    model.fuse_projections()
    return config, model


@pytest.mark.parametrize("prompts", [PROMPTS, PROMPTS[:1]], ids=["batch", "one-sequence"])
@pytest.mark.parametrize("sliding_window", [None, 6])
def test_compiled_decodes_equal_eager_decodes(fused_model, prompts, sliding_window):
    config, model = fused_model
    with torch.inference_mode():
        compiled = greedy_decodes(make_runner(model, config, torch.float32, True, sliding_window), prompts)
        eager = greedy_decodes(make_runner(model, config, torch.float32, False, sliding_window), prompts)
    for step, (got, expected) in enumerate(zip(compiled, eager)):
        assert got.shape == (len(prompts), config.vocab_size) and got.dtype == torch.float32
        # Same greedy tokens step after step: the compiled step wrote the cache the next step read.
        assert torch.equal(got.argmax(-1), expected.argmax(-1)), step
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_bfloat16_compiled_decodes_track_eager_ones(tiny_model_dir):
    """bfloat16 (the default on CPUs with native bf16 matmul): the query reaches the
    kernel as bfloat16 bits; fused elementwise work rounds less often than eager ops."""
    config, model = load_model(tiny_model_dir, dtype=torch.bfloat16)
    model.fuse_projections()
    with torch.inference_mode():
        compiled = greedy_decodes(make_runner(model, config, torch.bfloat16, True), PROMPTS, steps=1)
        eager = greedy_decodes(make_runner(model, config, torch.bfloat16, False), PROMPTS, steps=1)
    torch.testing.assert_close(compiled[0], eager[0], rtol=5e-2, atol=5e-2)


def test_steps_the_compiled_graph_does_not_cover_run_eagerly(fused_model):
    """A one-token prompt chunk that does not sample, or that wants prompt logprobs,
    runs eagerly; so does every step after the compiled one fails."""
    config, model = fused_model
    runner = make_runner(model, config, torch.float32, True)
    first = Sequence(EngineRequest("a", (5, 6, 7), SamplingParams(max_tokens=2)), 0)
    second = Sequence(EngineRequest("b", (8, 9), SamplingParams(max_tokens=2, prompt_logprobs=1)), 1)
    first.block_table, second.block_table = [0], [1]
    _, _, metadata, _ = runner.prepare([(first, 1), (second, 1)])
    assert not runner._compiled_step_fits([(first, 1), (second, 1)], [0], metadata)  # a row not sampled
    assert not runner._compiled_step_fits([(first, 1), (second, 1)], [0, 1], metadata)  # prompt logprobs
    assert runner._compiled_step_fits([(first, 1)], [0], runner.prepare([(first, 1)])[2])

    def broken(*args):
        raise RuntimeError("no C++ compiler")

    runner.decode_step = broken
    with torch.inference_mode():
        logits = greedy_decodes(runner, PROMPTS[:2], steps=2)
        expected = greedy_decodes(make_runner(model, config, torch.float32, False), PROMPTS[:2], steps=2)
    assert runner.decode_step is None
    for got, want in zip(logits, expected):
        torch.testing.assert_close(got, want)


def test_new_batch_sizes_and_contexts_do_not_compile_again(fused_model):
    config, model = fused_model
    runner = make_runner(model, config, torch.float32, True)
    with torch.inference_mode():
        greedy_decodes(runner, PROMPTS[:1], steps=1)  # the one-sequence graph
        greedy_decodes(runner, PROMPTS[:2], steps=1)  # the batch graph
        with torch.compiler.set_stance("fail_on_recompile"):
            greedy_decodes(runner, PROMPTS, steps=3)  # 4 sequences, contexts of 1 to 4 blocks
            greedy_decodes(runner, PROMPTS[2:], steps=2)
            greedy_decodes(runner, [tuple(range(3, 30))], steps=2)


def test_enforce_eager_runs_no_compiled_step(fused_model):
    config, model = fused_model
    assert make_runner(model, config, torch.float32, False).decode_step is None
    assert make_runner(model, config, torch.float32, True).decode_step is not None
    # A cache the in-place kernel cannot read (float16) has no compiled step either.
    cache = PagedKVCache.allocate(config, 2, BLOCK_SIZE, torch.float16, "cpu")
    assert ModelRunner(model, cache, torch.device("cpu"), compile_decodes=True).decode_step is None
