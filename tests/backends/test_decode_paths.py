"""The ways decodes attend give the same logits: reading the paged cache in place
(the CPU kernel), gathering contexts for torch's attention (the path CUDA takes
when it runs eagerly) and a step fitted to a decode graph's bucket and table width
(gathered from block tables on the device, as CUDA graphs replay it), all run here
on the CPU."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from lmserve.backends.torch.decode_graphs import DecodeGraphs
from lmserve.backends.torch.model_runner import ModelRunner
from lmserve.backends.torch.paged_cache import PagedKVCache
from lmserve.backends.torch.sequence import Sequence
from lmserve.backends.torch.weights import load_model
from lmserve.core.types import EngineRequest, SamplingParams

BLOCK_SIZE, NUM_BLOCKS = 4, 24
PROMPTS = [(5, 17, 42, 99, 3), (7, 8), tuple(range(20, 33)), (9,) * 8]


def decode_logits(model, config, dtype, decode_in_place, sliding_window=None, graphs=False):
    """Prefill every prompt, then one batched decode of all of them; its logits.
    ``graphs``: the decode runs as a decode graph would (batch 4 padded to 8 rows
    with ``max_batch_size`` 8; tables padded to a power of two of columns)."""
    cache = PagedKVCache.allocate(dataclasses.replace(config, sliding_window=sliding_window), NUM_BLOCKS,
                                  BLOCK_SIZE, dtype, "cpu")
    decode_graphs = None
    if graphs:
        decode_graphs = DecodeGraphs(model, cache, torch.device("cpu"), max_batch_size=8, max_blocks=NUM_BLOCKS)
    runner = ModelRunner(model, cache, torch.device("cpu"), decode_in_place=decode_in_place,
                         decode_graphs=decode_graphs)
    free = list(reversed(range(NUM_BLOCKS)))  # handed out back to front: tables are not sorted
    sequences = []
    for i, prompt in enumerate(PROMPTS):
        seq = Sequence(EngineRequest(f"r{i}", prompt, SamplingParams(max_tokens=4)), i)
        seq.block_table = [free.pop() for _ in range(-(-(len(prompt) + 1) // BLOCK_SIZE))]
        runner.run([(seq, len(prompt))], [0], fresh_blocks=seq.block_table)
        seq.num_computed_tokens = len(prompt)
        seq.token_ids.append(11 + i)
        sequences.append(seq)
    logits, _ = runner.run([(seq, 1) for seq in sequences], list(range(len(sequences))))
    return logits


@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-4), (torch.bfloat16, 5e-2)])
@pytest.mark.parametrize("sliding_window", [None, 6])
def test_in_place_gathered_and_graphed_decodes_agree(tiny_model_dir, dtype, tolerance, sliding_window):
    config, model = load_model(tiny_model_dir, dtype=dtype)
    model.fuse_projections()
    with torch.inference_mode():
        in_place = decode_logits(model, config, dtype, True, sliding_window)
        gathered = decode_logits(model, config, dtype, False, sliding_window)
        graphed = decode_logits(model, config, dtype, True, sliding_window, graphs=True)
    assert in_place.shape == graphed.shape == (len(PROMPTS), config.vocab_size)
    torch.testing.assert_close(in_place, gathered, rtol=tolerance, atol=tolerance)
    torch.testing.assert_close(in_place, graphed, rtol=tolerance, atol=tolerance)
    if dtype == torch.float32:
        assert (in_place.argmax(-1) == gathered.argmax(-1)).all()
        assert (in_place.argmax(-1) == graphed.argmax(-1)).all()


def test_the_cpu_reads_the_cache_in_place_by_default(tiny_model_dir):
    config, model = load_model(tiny_model_dir)
    for dtype, expected in ((torch.float32, True), (torch.bfloat16, True), (torch.float16, False)):
        cache = PagedKVCache.allocate(config, 2, BLOCK_SIZE, dtype, "cpu")
        assert ModelRunner(model, cache, torch.device("cpu")).decode_in_place is expected
