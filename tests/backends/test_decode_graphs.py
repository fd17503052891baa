"""Decode graphs' bucketing, padding and persistent inputs, checked on the CPU (the steps
run their fitted shapes without capture there; tests/backends/test_engine_cuda.py
replays real CUDA graphs)."""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np
import pytest
import torch

from lmserve.backends.torch.compiled_step import CompiledDecodeStep
from lmserve.backends.torch.decode_graphs import (
    DecodeGraphs,
    DecodeInputs,
    batch_buckets,
    smallest_fitting,
    table_widths,
)
from lmserve.backends.torch.factory import EngineConfig, build_engine
from lmserve.core.types import EngineRequest, SamplingParams

CPU = torch.device("cpu")


def test_batch_buckets_grow_by_eight_then_sixteen_and_end_at_the_largest_batch():
    assert batch_buckets(128) == (1, 2, 4, 8, 16, 24, 32, 40, 48, 56, 64, 80, 96, 112, 128)
    assert batch_buckets(100) == (1, 2, 4, 8, 16, 24, 32, 40, 48, 56, 64, 80, 96, 100)
    assert batch_buckets(5) == (1, 2, 4, 5)
    assert batch_buckets(4) == (1, 2, 4)
    assert batch_buckets(1) == (1,)
    for largest in range(1, 300):
        buckets = batch_buckets(largest)
        assert list(buckets) == sorted(set(buckets)) and buckets[-1] == largest
        # A step pads fewer than 8 rows up to a batch of 64, fewer than 16 beyond.
        assert all(smallest_fitting(buckets, n) - n < (8 if n <= 64 else 16) for n in range(1, largest + 1))


def test_table_widths_are_powers_of_two_up_to_the_longest_context():
    assert table_widths(128) == (2, 4, 8, 16, 32, 64, 128)
    assert table_widths(100) == (2, 4, 8, 16, 32, 64, 100)
    assert table_widths(2) == table_widths(1) == (2,)


def test_smallest_fitting_size():
    sizes = (1, 2, 4, 8, 16)
    assert [smallest_fitting(sizes, n) for n in (1, 3, 4, 5, 16)] == [1, 4, 4, 8, 16]
    assert smallest_fitting(sizes, 17) is None


def test_inputs_are_padded_and_stay_at_the_same_addresses():
    inputs = DecodeInputs(max_batch=8, max_width=16, null_block=99, block_size=4, device=CPU)
    first = inputs.fill(np.array([5, 6, 7]), np.array([9, 0, 4]), np.array([37, 40, 12]),
                        [[9, 10, 11], [10], [3, 5]], batch=4, width=4)
    assert first.input_ids.tolist() == [5, 6, 7, 0]
    assert first.positions.tolist() == [9, 0, 4, 0]
    assert first.slots.tolist() == [37, 40, 12, 99 * 4]  # the padding row writes into the null block
    assert first.context_lens.tolist() == [10, 1, 5, 1]
    assert first.block_tables.tolist() == [[9, 10, 11, 99], [10, 99, 99, 99], [3, 5, 99, 99], [99] * 4]
    again = inputs.fill(np.array([1]), np.array([2]), np.array([3]), [[4, 8]], batch=4, width=4)
    assert again.input_ids.tolist() == [1, 0, 0, 0]  # rows of the earlier step do not linger
    assert again.block_tables.tolist() == [[4, 8, 99, 99]] + [[99] * 4] * 3
    for before, after in zip(first, again):
        assert before.data_ptr() == after.data_ptr()


def small_engine(model_dir):
    """The tiny model's engine, op by op on the CPU, with 16 blocks of 4 tokens."""
    return build_engine(model_dir, EngineConfig(device="cpu", dtype="float32", enforce_eager=True,
                                                cache_block_seq_len=4, cache_max_entry_count=16))


def generate(model_dir, graphs: dict | None = None, wrap_run: Callable[[Callable], Callable] = lambda run: run):
    """Greedy tokens of every prompt of PROMPTS in one continuous batch, op by op on the CPU,
    with decode graphs built from ``graphs`` (DecodeGraphs' options) or none, their ``run``
    wrapped by ``wrap_run``; and the engine."""
    engine = build_engine(model_dir, EngineConfig(device="cpu", dtype="float32", enforce_eager=True,
                                                  cache_block_seq_len=4, cache_max_entry_count=128,
                                                  session_len=256))
    if graphs is not None:
        decode_graphs = DecodeGraphs(engine.runner.model, engine.runner.kv_cache, CPU, **graphs)
        decode_graphs.run = wrap_run(decode_graphs.run)
        engine.runner.decode_graphs = decode_graphs
    for rid, prompt in PROMPTS.items():
        params = SamplingParams(max_tokens=MAX_TOKENS[rid], temperature=0.0, ignore_eos=True)
        engine.add_request(EngineRequest(rid, prompt, params))
    tokens = {rid: [] for rid in PROMPTS}
    with torch.inference_mode():
        while engine.has_work:
            for out in engine.step():
                tokens[out.request_id].extend(out.new_token_ids)
    return tokens, engine


def recording(shapes: list) -> Callable[[Callable], Callable]:
    """A ``wrap_run`` that appends the shape of every step to ``shapes``."""
    return lambda run: lambda shape, *args: shapes.append(shape) or run(shape, *args)


# Six requests finishing one after another: the batch shrinks through several buckets,
# and contexts grow from 1 to 11 blocks of 4 tokens (table widths 2 to 16).
PROMPTS = {"a": (5, 17, 42, 99, 3), "b": tuple(range(20, 34)), "c": (7,) * 4, "d": (9, 8, 7),
           "e": tuple(range(40, 47)), "f": (11, 12)}
MAX_TOKENS = {"a": 30, "b": 6, "c": 12, "d": 20, "e": 3, "f": 25}


@pytest.mark.parametrize("gather", [True, False], ids=["gathered", "in-place"])
def test_graphed_decodes_give_the_eager_engines_tokens(tiny_model_dir, gather):
    expected, _ = generate(tiny_model_dir)
    shapes = []
    tokens, _ = generate(tiny_model_dir, {"max_batch_size": 8, "max_blocks": 64, "gather": gather}, recording(shapes))
    assert tokens == expected
    assert {batch for batch, _ in shapes} == {8, 4, 2, 1}
    assert {width for _, width in shapes} >= {4, 8, 16}


def test_steps_beyond_the_largest_bucket_or_width_run_eagerly(tiny_model_dir):
    expected, _ = generate(tiny_model_dir)
    # Batches of at most 4 and contexts of at most 4 blocks (16 tokens) fit a graph.
    shapes = []
    tokens, _ = generate(tiny_model_dir, {"max_batch_size": 4, "max_blocks": 4}, recording(shapes))
    assert tokens == expected
    assert shapes and all(batch <= 4 and width <= 4 for batch, width in shapes)


def test_a_failing_graph_leaves_every_step_to_the_eager_path(tiny_model_dir, caplog):
    expected, _ = generate(tiny_model_dir)
    calls = []

    def refuse(run):
        def refused(*args):
            calls.append(args)
            raise RuntimeError("operation not permitted when stream is capturing")
        return refused

    tokens, engine = generate(tiny_model_dir, {"max_batch_size": 8, "max_blocks": 64}, refuse)
    assert tokens == expected
    assert len(calls) == 1 and engine.runner.decode_graphs is None
    assert "A decode graph failed" in caplog.text


def test_padding_rows_write_only_into_the_null_block(tiny_model_dir):
    """Three decodes padded to a batch of four: every cache row outside the three
    sequences' new slots and the null block is left as it was."""
    engine = small_engine(tiny_model_dir)
    cache = engine.runner.kv_cache
    graphs = DecodeGraphs(engine.runner.model, cache, CPU, max_batch_size=4, max_blocks=16)
    for layer in (*cache.keys, *cache.values):
        layer.normal_()
    before = [layer.clone() for layer in (*cache.keys, *cache.values)]
    positions = np.array([5, 0, 9])
    slots = np.array([1 * 4 + 1, 2 * 4, 7 * 4 + 1])
    with torch.inference_mode():
        logits = graphs.run((4, 4), np.array([3, 4, 5]), positions, slots, [[0, 1], [2], [6, 5, 7]])
    assert logits.shape == (3, engine.runner.model.config.vocab_size)
    written = set(slots.tolist()) | set(range(cache.null_block * 4, cache.null_block * 4 + 4))
    untouched = [row for row in range(cache.num_slots) if row not in written]
    for old, new in zip(before, (*cache.keys, *cache.values)):
        heads = new.view(cache.num_kv_heads, cache.num_slots, -1)
        old_heads = old.view(cache.num_kv_heads, cache.num_slots, -1)
        assert torch.equal(heads[:, untouched], old_heads[:, untouched])
        assert not torch.equal(heads[:, sorted(slots.tolist())], old_heads[:, sorted(slots.tolist())])



def test_shapes_that_would_gather_too_much_get_no_graph(tiny_model_dir):
    engine = small_engine(tiny_model_dir)
    graphs = DecodeGraphs(engine.runner.model, engine.runner.kv_cache, CPU, max_batch_size=16, max_blocks=16,
                          max_gathered_tokens=64)
    assert graphs.shapes() == sorted(graphs.shapes(), reverse=True)
    assert all(batch * width * 4 <= 64 for batch, width in graphs.shapes())
    assert (16, 2) not in graphs.shapes() and (8, 2) in graphs.shapes() and (1, 16) in graphs.shapes()
    assert graphs.shape_for(9, 5) is None  # 16 x 2 blocks of 4: 128 positions
    assert graphs.shape_for(7, 5) == (8, 2)
    assert graphs.shape_for(1, 65) is None  # 17 blocks: wider than any table


def test_the_warm_up_runs_every_shape_writing_only_the_null_block(tiny_model_dir):
    """Without capture (the CPU), capture_all runs each shape once on padding alone."""
    engine = small_engine(tiny_model_dir)
    cache = engine.runner.kv_cache
    graphs = DecodeGraphs(engine.runner.model, cache, CPU, max_batch_size=8, max_blocks=16)
    steps = []
    step = graphs._step
    graphs._step = lambda views: steps.append(views.block_tables.shape) or step(views)
    for layer in (*cache.keys, *cache.values):
        layer.normal_()
    before = [layer.clone() for layer in (*cache.keys, *cache.values)]
    engine.runner.decode_graphs = graphs
    with torch.inference_mode():
        engine.runner.capture_decode_graphs()
    assert sorted(steps, reverse=True) == graphs.shapes() and len(steps) == 4 * 4  # buckets 1-8 x widths 2-16
    null_rows = slice(cache.null_block * 4, cache.null_block * 4 + 4)
    for old, new in zip(before, (*cache.keys, *cache.values)):
        heads, old_heads = (t.view(cache.num_kv_heads, cache.num_slots, -1) for t in (new, old))
        assert torch.equal(heads[:, : null_rows.start], old_heads[:, : null_rows.start])
        assert not torch.equal(heads[:, null_rows], old_heads[:, null_rows])
    assert engine.runner.decode_graphs is graphs


def test_a_refused_capture_leaves_every_step_eager(tiny_model_dir, caplog):
    engine = small_engine(tiny_model_dir)
    graphs = DecodeGraphs(engine.runner.model, engine.runner.kv_cache, CPU, max_batch_size=8, max_blocks=16)

    def refuse():
        raise RuntimeError("CUDA error: operation not permitted when stream is capturing")

    graphs.capture_all = refuse
    engine.runner.decode_graphs = graphs
    engine.runner.capture_decode_graphs()
    assert engine.runner.decode_graphs is None
    assert "Capturing the decode graphs failed" in caplog.text


def test_graphs_of_the_compiled_step_give_the_eager_engines_tokens(tiny_model_dir):
    """CUDA's graphs record the compiled step (fused kernels); here it runs uncaptured."""
    expected, _ = generate(tiny_model_dir)
    compiled = []

    def compile_step(run):
        graphs = run.__self__
        graphs.step = CompiledDecodeStep(graphs.model)
        compiled.append(graphs.step)
        return run

    tokens, engine = generate(tiny_model_dir, {"max_batch_size": 8, "max_blocks": 64}, compile_step)
    assert tokens == expected
    assert engine.runner.decode_graphs.step is compiled[0]


def test_a_compiled_step_that_fails_is_captured_op_by_op(tiny_model_dir, caplog):
    caplog.set_level(logging.INFO, logger="lmserve")
    engine = small_engine(tiny_model_dir)
    graphs = DecodeGraphs(engine.runner.model, engine.runner.kv_cache, CPU, max_batch_size=8, max_blocks=16,
                          step=CompiledDecodeStep(engine.runner.model))

    def no_compiler(*args):
        raise RuntimeError("InductorError: no C++ compiler")

    graphs.step._compiled = no_compiler
    engine.runner.decode_graphs = graphs
    with torch.inference_mode():
        engine.runner.capture_decode_graphs()
    assert engine.runner.decode_graphs is graphs and not isinstance(graphs.step, CompiledDecodeStep)
    assert "capturing the model op by op" in caplog.text
    assert "Decode graphs: 0 captured (op by op)" in caplog.text  # nothing is captured off CUDA
