"""The batched engine on the real model: batching, prefix caching and preemption change nothing."""

import queue

import pytest

from lmserve.backends.torch.factory import EngineConfig, create_backend
from lmserve.core.types import EngineRequest, FinishReason, SamplingParams
from lmserve.plugins.tokenizer_files import tokenizer_from_gguf

pytestmark = pytest.mark.real_model

NEW_TOKENS = 24
SYSTEM = "You are a helpful assistant. Answer briefly and precisely. " * 3


def prompts(tokenizer):
    topics = ["the sea", "Paris", "prime numbers", "a cat", "rain", "Python lists", "the moon", "tea",
              "bicycles", "volcanoes", "chess", "honey bees", "winter", "a lighthouse", "jazz", "bread"]
    out = []
    for i, topic in enumerate(topics):
        text = f"<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\n" + "Tell me about " + topic + \
               "." * (1 + i % 3) + " Please." * (i * 7 % 23) + "<|im_end|>\n<|im_start|>assistant\n"
        out.append(tokenizer.encode(text, add_bos=False))
    return out


class Runner:
    def __init__(self, path, **config):
        self.backend = create_backend(path, EngineConfig(**{"dtype": "float32", "session_len": 1024,
                                                            "quantization": "none", "enforce_eager": True, **config}))
        self.outputs = queue.SimpleQueue()
        self.backend.start(lambda outs: [self.outputs.put(o) for o in outs])
        self.engine = self.backend.engine

    def run(self, requests: dict[str, tuple[list[int], SamplingParams]], abort_after: dict | None = None):
        abort_after = abort_after or {}
        for rid, (ids, params) in requests.items():
            self.backend.submit(EngineRequest(rid, tuple(ids), params))
            if abort_after.get(rid) == 0:
                self.backend.abort(rid)
        tokens = {rid: [] for rid in requests}
        reasons = {}
        while len(reasons) < len(requests):
            out = self.outputs.get(timeout=300)
            tokens[out.request_id].extend(out.new_token_ids)
            if out.finish_reason is not None:
                reasons[out.request_id] = out.finish_reason
            elif len(tokens[out.request_id]) == abort_after.get(out.request_id):
                self.backend.abort(out.request_id)
        return tokens, reasons


@pytest.fixture(scope="module")
def tokenizer(smollm2_gguf):
    return tokenizer_from_gguf(smollm2_gguf)


@pytest.fixture(scope="module")
def alone(smollm2_gguf, tokenizer):
    """Each prompt run by itself: the reference."""
    runner = Runner(smollm2_gguf, cache_max_entry_count=64)
    greedy = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True)
    result = {}
    for i, ids in enumerate(prompts(tokenizer)):
        tokens, _ = runner.run({f"p{i}": (ids, greedy)})
        result[f"p{i}"] = tokens[f"p{i}"]
    runner.backend.shutdown()
    return result


def batch(tokenizer):
    greedy = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True)
    return {f"p{i}": (ids, greedy) for i, ids in enumerate(prompts(tokenizer))}


@pytest.mark.parametrize(
    "config",
    [
        dict(cache_max_entry_count=128),
        dict(cache_max_entry_count=128, enable_prefix_caching=True),
        dict(cache_max_entry_count=12, cache_block_seq_len=16, max_prefill_token_num=64),
        dict(cache_max_entry_count=128, enforce_eager=False),
    ],
    ids=["batched", "prefix-caching", "preempting", "compiled-decodes"],
)
def test_sixteen_concurrent_requests_equal_each_alone(smollm2_gguf, tokenizer, alone, config):
    runner = Runner(smollm2_gguf, **config)
    try:
        free_before = runner.engine.block_manager.num_free_blocks
        tokens, reasons = runner.run(batch(tokenizer))
        assert set(reasons.values()) == {FinishReason.LENGTH}
        assert tokens == alone
        if config.get("enable_prefix_caching"):
            assert runner.engine.block_manager.num_cached_blocks > 0
            tokens, _ = runner.run(batch(tokenizer))  # again: now from the prefix cache
            assert tokens == alone
        if config["cache_max_entry_count"] == 12:
            assert runner.engine.scheduler.num_preemptions > 0, "the small cache must force preemption"
        assert runner.engine.block_manager.num_free_blocks == free_before
    finally:
        runner.backend.shutdown()


def test_no_blocks_leak_after_finished_aborted_and_preempted_requests(smollm2_gguf, tokenizer):
    runner = Runner(smollm2_gguf, cache_max_entry_count=12, cache_block_seq_len=16,
                    enable_prefix_caching=True)
    try:
        total = runner.engine.block_manager.num_blocks
        assert runner.engine.block_manager.num_free_blocks == total
        requests = batch(tokenizer)
        abort_after = {"p1": 3, "p4": 10, "p9": 1}
        _, reasons = runner.run(requests, abort_after)
        assert {reasons[r] for r in abort_after} == {FinishReason.ABORT}
        assert runner.engine.scheduler.num_preemptions > 0
        late = {rid + "-late": requests[rid] for rid in list(requests)[:4]}
        _, reasons = runner.run(late, abort_after=dict.fromkeys(late, 0))  # aborted before they start
        assert set(reasons.values()) == {FinishReason.ABORT}
        runner.run({"last": requests["p0"]})
        assert runner.engine.sequences == {}
        assert runner.engine.block_manager.num_free_blocks == total
        assert set(runner.engine.block_manager.ref_counts) == {0}
    finally:
        runner.backend.shutdown()


def test_seeded_sampling_is_the_same_alone_and_in_a_batch(smollm2_gguf, tokenizer):
    runner = Runner(smollm2_gguf, cache_max_entry_count=128)
    try:
        ids = prompts(tokenizer)
        params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.9, top_p=0.95, top_k=50, seed=4321, ignore_eos=True)
        alone_tokens, _ = runner.run({"seeded": (ids[3], params)})
        others = {f"o{i}": (ids[i], SamplingParams(max_tokens=NEW_TOKENS, temperature=1.0, seed=i)) for i in range(6)}
        batched, _ = runner.run({**others, "seeded": (ids[3], params)})
        assert batched["seeded"] == alone_tokens["seeded"]
        unseeded, _ = runner.run({"a": (ids[3], SamplingParams(max_tokens=NEW_TOKENS, temperature=0.9, ignore_eos=True))})
        assert unseeded["a"] != alone_tokens["seeded"]
    finally:
        runner.backend.shutdown()
