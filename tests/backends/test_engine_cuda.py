"""The torch engine on a GPU gives the tokens it gives on the CPU (skipped without CUDA).

On CUDA the engine takes its other paths: steps of decodes replay CUDA graphs
(decodes gather their blocks and attend with torch's fused SDPA; eagerly with
``enforce_eager``), linear layers stay ``nn.Linear`` (no oneDNN packing),
sampling runs the Numba ``@cuda.jit`` kernel.
"""

from __future__ import annotations

import pytest
import torch

from lmserve.backends.torch.compiled_step import CompiledDecodeStep
from lmserve.backends.torch.factory import EngineConfig, build_engine
from lmserve.core.types import EngineRequest, FinishReason, SamplingParams

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

# Mixed lengths: shorter than a block, several blocks, one ending on a block boundary.
PROMPTS = {"a": (5, 17, 42, 99, 3), "b": tuple(range(20, 60)), "c": (7,) * 16, "d": tuple(range(100, 133)),
           "e": (9, 8, 7)}


def generate(model_dir, device: str, dtype: str, params: SamplingParams | dict[str, SamplingParams],
             prompts=PROMPTS, engines: list | None = None, **options):
    """Every prompt in one continuous batch; tokens and finish reasons by request id.
    ``params``: the same for every request, or by request id; ``options``: more of the
    engine's config; ``engines``: the engine is appended there."""
    engine = build_engine(model_dir, EngineConfig(device=device, dtype=dtype, cache_max_entry_count=64,
                                                  cache_block_seq_len=16, session_len=256, **options))
    if engines is not None:
        engines.append(engine)
    for rid, prompt in prompts.items():
        engine.add_request(EngineRequest(rid, prompt, params[rid] if isinstance(params, dict) else params))
    tokens, reasons = {rid: [] for rid in prompts}, {}
    with torch.inference_mode():
        while engine.has_work:
            for out in engine.step():
                tokens[out.request_id].extend(out.new_token_ids)
                if out.finish_reason is not None:
                    reasons[out.request_id] = out.finish_reason
    return tokens, reasons


def test_greedy_float32_tokens_equal_the_cpus(tiny_model_dir):
    greedy = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    on_gpu, _ = generate(tiny_model_dir, "cuda", "float32", greedy)
    on_cpu, _ = generate(tiny_model_dir, "cpu", "float32", greedy)
    assert on_gpu == on_cpu


def test_decode_graphs_give_the_eager_engines_and_the_cpus_tokens(tiny_model_dir):
    """Requests of different lengths: the batch shrinks through the buckets 8, 4, 2, 1
    and contexts grow past one block of 16 (table widths 2 and 4); every decode step fits a graph."""
    prompts = {f"r{i}": tuple(range(10 + i, 20 + 3 * i)) for i in range(6)}
    params = {f"r{i}": SamplingParams(max_tokens=6 + 7 * i, temperature=0.0, ignore_eos=True) for i in range(6)}
    engines = []
    graphed, _ = generate(tiny_model_dir, "cuda", "float32", params, prompts, engines)
    eager, _ = generate(tiny_model_dir, "cuda", "float32", params, prompts, engines, enforce_eager=True)
    on_cpu, _ = generate(tiny_model_dir, "cpu", "float32", params, prompts)
    assert graphed == eager == on_cpu
    graphs = engines[0].runner.decode_graphs
    assert graphs is not None  # no step failed in its graph (which turns them off)
    assert isinstance(graphs.step, CompiledDecodeStep)  # not the op-by-op fallback
    assert set(graphs.graphs) == set(graphs.shapes())  # the warm-up captured every shape
    assert engines[1].runner.decode_graphs is None


def test_seeded_sampling_draws_the_cpus_tokens(tiny_model_dir):
    """Same logits (float32) and the same Philox stream: the CUDA sampling kernel
    draws what the CPU kernel draws."""
    sampled = SamplingParams(max_tokens=16, temperature=1.0, top_p=0.9, top_k=50, seed=7, ignore_eos=True)
    on_gpu, _ = generate(tiny_model_dir, "cuda", "float32", sampled)
    on_cpu, _ = generate(tiny_model_dir, "cpu", "float32", sampled)
    assert on_gpu == on_cpu


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_runs_every_request_to_its_length(tiny_model_dir, dtype):
    greedy = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True)
    tokens, reasons = generate(tiny_model_dir, "cuda", dtype, greedy)
    assert reasons == dict.fromkeys(PROMPTS, FinishReason.LENGTH)
    assert all(len(ids) == 20 for ids in tokens.values())
    again, _ = generate(tiny_model_dir, "cuda", dtype, greedy)
    assert again == tokens  # the same batch gives the same tokens
