"""With ``batch_invariant`` a request's tokens (and their logprobs, to the bit) are the same
alone, in a batch of 32 mixed-length requests, and at any position in it: greedy and
seeded, quantized or not, compiled or eager. Without it they are not (the quantized
layers switch matmuls with the step's rows, prompts are chunked by the neighbours'
budget, mixed steps run another path than decode steps)."""

from __future__ import annotations

import random

import pytest

from lmserve.backends.torch.factory import EngineConfig, build_engine
from lmserve.core.types import EngineRequest, SamplingParams

NUM_PROBES, BATCH_SIZE = 10, 32
#: The real model's batch: its 10 probes and 12 chats of 16 to 93 tokens (prompts of up to 600).
REAL_MODEL_FILLERS = 12


def probe_requests(prompts: list[list[int]], max_tokens: int) -> list[EngineRequest]:
    """Each prompt greedy and seeded (temperature 0.8, top_p 0.9, a seed of its own), with logprobs."""
    requests = []
    for i, ids in enumerate(prompts):
        greedy = SamplingParams(max_tokens=max_tokens, temperature=0.0, logprobs=2)
        seeded = SamplingParams(max_tokens=max_tokens, temperature=0.8, top_p=0.9, seed=100 + i, logprobs=2)
        requests += [EngineRequest(f"greedy-{i}", tuple(ids), greedy), EngineRequest(f"seeded-{i}", tuple(ids), seeded)]
    return requests


def filler_requests(prompts: list[list[int]], max_tokens: int) -> list[EngineRequest]:
    return [EngineRequest(f"filler-{i}", tuple(ids), SamplingParams(max_tokens=max_tokens + 7 * i, temperature=0.0,
                                                                    ignore_eos=True))
            for i, ids in enumerate(prompts)]


def generate(engine, requests: list[EngineRequest], late: list[EngineRequest] = (), after_steps: int = 0) -> dict:
    """``request id -> (tokens, logprobs)``; ``late`` are added after ``after_steps`` steps."""
    results = {r.request_id: ([], []) for r in [*requests, *late]}
    for request in requests:
        engine.add_request(request)
    steps = 0
    while engine.has_work or (late and steps <= after_steps):
        if late and steps == after_steps:
            for request in late:
                engine.add_request(request)
        for out in engine.step():
            assert out.error is None, out.error
            tokens, logprobs = results[out.request_id]
            tokens.extend(out.new_token_ids)
            logprobs.extend((lp.logprob, lp.top) for lp in out.logprobs or ())
        steps += 1
    return results


def differences(engine, probes: list[EngineRequest], fillers: list[EngineRequest]) -> list[str]:
    """The probes whose tokens or logprobs in a batch differ from those alone: the probes
    before the fillers, after them in reverse order, and added once the fillers started."""
    alone = {}
    for probe in probes:
        alone.update(generate(engine, [probe]))
    assert all(alone[p.request_id][0] for p in probes)
    placements = {
        "first": generate(engine, probes + fillers),
        "last, reversed": generate(engine, fillers + probes[::-1]),
        "after the others started": generate(engine, fillers, late=probes, after_steps=3),
    }
    # Recompute after preemption prefills prompt and output anew: not the same arithmetic.
    assert engine.scheduler.num_preemptions == 0
    return [f"{p.request_id} ({where})" for where, results in placements.items() for p in probes
            if results[p.request_id] != alone[p.request_id]]


def tiny_workload(max_tokens: int = 12):
    rng = random.Random(0)
    lengths = [rng.randint(5, 300) for _ in range(NUM_PROBES // 2)]
    probes = probe_requests([[rng.randrange(3, 128) for _ in range(n)] for n in lengths], max_tokens)
    others = [[rng.randrange(3, 128) for _ in range(rng.randint(30, 600))] for _ in range(BATCH_SIZE - len(probes))]
    return probes, filler_requests(others, 3 * max_tokens)


def tiny_engine(model_dir, **options):
    # A small prefill cap, so that prompts are chunked and neighbours share the budget.
    return build_engine(model_dir, EngineConfig(device="cpu", dtype="float32", session_len=1024,
                                                cache_max_entry_count=2048, cache_block_seq_len=16,
                                                max_prefill_token_num=256, **options))


@pytest.mark.parametrize("quantization, enforce_eager", [("int4", True), ("none", True), ("int4", False)])
def test_replies_do_not_depend_on_the_batch_with_batch_invariance(long_model_dir, quantization, enforce_eager):
    engine = tiny_engine(long_model_dir, quantization=quantization, enforce_eager=enforce_eager,
                         batch_invariant=True)
    assert differences(engine, *tiny_workload()) == []


def test_replies_depend_on_the_batch_without_it(long_model_dir):
    # The int4 layers multiply steps of more than 8 rows with their dense copy.
    engine = tiny_engine(long_model_dir, quantization="int4", enforce_eager=True)
    assert differences(engine, *tiny_workload()) != []


def test_batch_invariant_prompts_are_chunked_at_fixed_positions(long_model_dir):
    engine = tiny_engine(long_model_dir, quantization="none", enforce_eager=True, batch_invariant=True)
    chunks = []
    run = engine.runner.run
    engine.runner.run = lambda scheduled, *args: (
        chunks.extend((s.request.request_id, s.num_computed_tokens, n) for s, n in scheduled if n > 1)
        or run(scheduled, *args))
    generate(engine, filler_requests([[5] * 200, [6] * 600], 2))
    assert all((start + n) % 256 == 0 or start + n in (200, 600) for _, start, n in chunks)
    assert all(start % 256 == 0 for _, start, _ in chunks)


@pytest.mark.real_model
def test_chats_do_not_depend_on_the_batch_on_the_real_model(smollm2_gguf, hf_smollm2_tokenizer):
    def chat(text: str) -> list[int]:
        prompt = hf_smollm2_tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                                          add_generation_prompt=True)
        return hf_smollm2_tokenizer(prompt, add_special_tokens=False)["input_ids"]

    chats = ["What is the capital of France?", "Write a haiku about the sea.", "Why is the sky blue?",
             "List three uses of copper.", "What does a compiler do?"]
    prompts = [chat(c) for c in chats]
    base = "The history of computing is longer than the history of computing hardware. "
    others = [chat(base * (1 + i * 5 % 40)) for i in range(REAL_MODEL_FILLERS)]
    # Eager: compiled decodes are checked on the tiny model; compiling the real one costs minutes.
    engine = build_engine(smollm2_gguf, EngineConfig(device="cpu", dtype="float32", session_len=2048,
                                                     cache_max_entry_count=0.2, batch_invariant=True,
                                                     enforce_eager=True))
    assert differences(engine, probe_requests(prompts, 32), filler_requests(others, 16)) == []
