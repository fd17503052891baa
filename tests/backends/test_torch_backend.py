"""The torch backend's engine thread on a tiny random model."""

import queue

import pytest
import torch

from lmserve.backends.torch.factory import EngineConfig, create_backend
from lmserve.backends.torch.weights import load_model
from lmserve.core.types import EngineRequest, FinishReason, SamplingParams
from tests.reference_kv_cache import KVCache

PROMPT = (5, 17, 42, 99, 3, 64, 7, 8, 120, 33, 2, 11)


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    return load_model(tiny_model_dir)


class Collector:
    """A sink that files outputs by request id, for a test to wait on."""

    def __init__(self):
        self.outputs = queue.SimpleQueue()

    def __call__(self, outputs):
        for out in outputs:
            self.outputs.put(out)

    def run_until_finished(self, request_ids, timeout=60):
        tokens = {rid: [] for rid in request_ids}
        reasons = {}
        while len(reasons) < len(request_ids):
            out = self.outputs.get(timeout=timeout)
            tokens[out.request_id].extend(out.new_token_ids)
            if out.finish_reason is not None:
                assert out.request_id not in reasons, "a request finished twice"
                reasons[out.request_id] = out.finish_reason
        return tokens, reasons


def make_backend(tiny_model_dir, **kwargs):
    options = dict(dtype="float32", cache_max_entry_count=64, cache_block_seq_len=16, session_len=256)
    options.update(kwargs)
    backend = create_backend(tiny_model_dir, EngineConfig(**options))
    collector = Collector()
    backend.start(collector)
    return backend, collector


def reference_greedy(tiny, prompt, n):
    """Greedy decoding without reusing the cache: the whole sequence every step."""
    config, model = tiny
    ids = list(prompt)
    with torch.inference_mode():
        for _ in range(n):
            cache = KVCache.allocate(config, 256, dtype=torch.float32, device="cpu")
            hidden = model(torch.tensor(ids), torch.arange(len(ids)), cache)
            ids.append(int(model.compute_logits(hidden[-1:])[0].argmax()))
    return ids[len(prompt):]


def greedy(max_tokens, **kwargs):
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True, **kwargs)


@pytest.mark.parametrize("max_prefill_token_num", [1024, 5])
def test_greedy_tokens_equal_a_plain_recompute_loop(tiny, tiny_model_dir, max_prefill_token_num):
    backend, collector = make_backend(tiny_model_dir, max_prefill_token_num=max_prefill_token_num)
    try:
        backend.submit(EngineRequest("a", PROMPT, greedy(12)))
        tokens, reasons = collector.run_until_finished(["a"])
    finally:
        backend.shutdown()
    assert reasons["a"] is FinishReason.LENGTH
    assert tokens["a"] == reference_greedy(tiny, PROMPT, 12)


def test_requests_queue_in_order_and_each_is_independent(tiny, tiny_model_dir):
    backend, collector = make_backend(tiny_model_dir)
    try:
        backend.submit(EngineRequest("long", PROMPT, greedy(6)))
        backend.submit(EngineRequest("short", PROMPT[:4], greedy(6)))
        tokens, _ = collector.run_until_finished(["long", "short"])
    finally:
        backend.shutdown()
    assert tokens["long"] == reference_greedy(tiny, PROMPT, 6)
    assert tokens["short"] == reference_greedy(tiny, PROMPT[:4], 6)


def test_abort_of_running_and_waiting_requests(tiny, tiny_model_dir):
    backend, collector = make_backend(tiny_model_dir, max_batch_size=1)
    try:
        backend.submit(EngineRequest("running", PROMPT, greedy(200)))
        backend.submit(EngineRequest("waiting", PROMPT, greedy(200)))
        first = collector.outputs.get(timeout=60)
        assert first.request_id == "running"
        backend.abort("waiting")
        backend.abort("running")
        backend.abort("never-submitted")  # ignored
        tokens, reasons = collector.run_until_finished(["running", "waiting"])
        assert reasons == {"running": FinishReason.ABORT, "waiting": FinishReason.ABORT}
        assert len(tokens["running"]) < 200 and tokens["waiting"] == []
        backend.submit(EngineRequest("after", PROMPT, greedy(3)))  # the engine goes on
        tokens, reasons = collector.run_until_finished(["after"])
        assert reasons["after"] is FinishReason.LENGTH and len(tokens["after"]) == 3
    finally:
        backend.shutdown()
    assert not backend.is_healthy()


def test_shutdown_aborts_everything_in_flight(tiny, tiny_model_dir):
    backend, collector = make_backend(tiny_model_dir)
    backend.submit(EngineRequest("x", PROMPT, greedy(200)))
    backend.submit(EngineRequest("y", PROMPT, greedy(200)))
    collector.outputs.get(timeout=60)
    backend.shutdown()
    _, reasons = collector.run_until_finished(["x", "y"])
    assert set(reasons.values()) == {FinishReason.ABORT}


def test_eos_stops_unless_ignored(tiny, tiny_model_dir):
    config, _ = tiny
    first_token = reference_greedy(tiny, PROMPT, 1)[0]
    backend, collector = make_backend(tiny_model_dir)
    try:
        backend.submit(EngineRequest("stop", PROMPT, SamplingParams(max_tokens=5, temperature=0.0, stop_token_ids=(first_token,))))
        tokens, reasons = collector.run_until_finished(["stop"])
        assert reasons["stop"] is FinishReason.STOP and tokens["stop"] == [first_token]
    finally:
        backend.shutdown()


def test_seeded_sampling_is_reproducible(tiny, tiny_model_dir):
    backend, collector = make_backend(tiny_model_dir)
    params = dict(max_tokens=16, temperature=1.0, top_p=0.95, top_k=50, ignore_eos=True)
    try:
        for rid, seed in (("a", 7), ("b", 7), ("c", 8)):
            backend.submit(EngineRequest(rid, PROMPT, SamplingParams(seed=seed, **params)))
        tokens, _ = collector.run_until_finished(["a", "b", "c"])
    finally:
        backend.shutdown()
    assert tokens["a"] == tokens["b"]
    assert tokens["a"] != tokens["c"]


def test_a_request_that_breaks_the_model_fails_alone(tiny, tiny_model_dir):
    config, _ = tiny
    backend, collector = make_backend(tiny_model_dir)
    try:
        backend.submit(EngineRequest("bad", (config.vocab_size + 5,), greedy(2)))  # out of the vocabulary
        backend.submit(EngineRequest("good", PROMPT, greedy(2)))
        tokens, reasons = collector.run_until_finished(["bad", "good"])
    finally:
        backend.shutdown()
    assert reasons == {"bad": FinishReason.ERROR, "good": FinishReason.LENGTH}
    assert len(tokens["good"]) == 2


def test_stats_count_the_kv_cache_memory_written_so_far(tiny, tiny_model_dir):
    backend, collector = make_backend(tiny_model_dir, cache_max_entry_count=64)
    cache, blocks = backend.engine.runner.kv_cache, backend.engine.block_manager
    try:
        before = backend.stats().kv_cache_written_bytes
        assert before == blocks.num_blocks_ever_used * cache.block_bytes > 0  # the warm-up wrote some
        backend.submit(EngineRequest("long", PROMPT * 8, greedy(4)))
        collector.run_until_finished(["long"])
        after = backend.stats().kv_cache_written_bytes
        backend.submit(EngineRequest("again", PROMPT * 8, greedy(4)))  # reuses the freed blocks
        collector.run_until_finished(["again"])
        assert backend.stats().kv_cache_written_bytes == after
    finally:
        backend.shutdown()
    assert after > before
    assert cache.block_bytes == sum(t[:cache.block_size * cache.num_kv_heads].nbytes for t in (*cache.keys, *cache.values))


def test_leftover_memory_in_the_cache_never_leaks_into_attention(tiny, tiny_model_dir):
    """Never-used blocks may hold anything (even NaN), reused ones an earlier
    sequence's keys/values: the result must not change."""
    backend, collector = make_backend(tiny_model_dir, cache_max_entry_count=16)
    cache = backend.engine.runner.kv_cache
    used = torch.tensor([b for b in range(cache.num_blocks) if backend.engine.block_manager._ever_used[b]])
    assert len(used), "the warm-up used some blocks"
    for tensor in (*cache.keys, *cache.values):
        blocks = tensor.view(cache.num_kv_heads, -1, cache.block_size * cache.head_dim)
        stale = blocks[:, used].clone().uniform_(-1e4, 1e4)
        blocks.fill_(float("nan"))
        blocks[:, used] = stale
    cache.clear_blocks([cache.null_block])
    try:
        prompts = {"a": PROMPT, "b": PROMPT[:3], "c": PROMPT[:7]}
        for rid, prompt in prompts.items():
            backend.submit(EngineRequest(rid, prompt, greedy(20)))
        tokens, _ = collector.run_until_finished(list(prompts))
    finally:
        backend.shutdown()
    for rid, prompt in prompts.items():
        assert tokens[rid] == reference_greedy(tiny, prompt, 20)


def reference_logprobs(tiny, ids):
    """log_softmax of the reference model's next-token logits after ``ids``."""
    config, model = tiny
    with torch.inference_mode():
        cache = KVCache.allocate(config, 256, dtype=torch.float32, device="cpu")
        hidden = model(torch.tensor(ids), torch.arange(len(ids)), cache)
        return torch.log_softmax(model.compute_logits(hidden[-1:])[0].float(), dim=-1)


def test_logprobs_are_the_models_and_ride_with_each_token(tiny, tiny_model_dir):
    backend, collector = make_backend(tiny_model_dir)
    outputs = []
    try:
        backend.submit(EngineRequest("lp", PROMPT, greedy(4, logprobs=3)))
        backend.submit(EngineRequest("plain", PROMPT, greedy(4)))
        done = 0
        while done < 2:
            out = collector.outputs.get(timeout=60)
            outputs.append(out)
            done += out.finish_reason is not None
    finally:
        backend.shutdown()
    assert all(out.logprobs is None for out in outputs if out.request_id == "plain")
    records = [lp for out in outputs if out.request_id == "lp" for lp in out.logprobs]
    tokens = [t for out in outputs if out.request_id == "lp" for t in out.new_token_ids]
    assert [r.token_id for r in records] == tokens and len(tokens) == 4
    for i, record in enumerate(records):
        expected = reference_logprobs(tiny, list(PROMPT) + tokens[:i])
        assert record.logprob == pytest.approx(float(expected[record.token_id]), abs=1e-4)
        top_values, top_ids = expected.topk(3)
        assert [t for t, _ in record.top] == top_ids.tolist()
        assert [v for _, v in record.top] == pytest.approx(top_values.tolist(), abs=1e-4)
        assert record.top[0][0] == record.token_id, "greedy picks the most likely token"


def test_min_tokens_holds_back_eos_and_stop_tokens(tiny, tiny_model_dir):
    first = reference_greedy(tiny, PROMPT, 1)[0]
    backend, collector = make_backend(tiny_model_dir)
    try:
        # The first greedy token is a stop token: without min_tokens the request ends at once.
        backend.submit(EngineRequest("free", PROMPT, greedy(8, stop_token_ids=(first,))))
        backend.submit(EngineRequest("held", PROMPT, greedy(8, stop_token_ids=(first,), min_tokens=3)))
        tokens, reasons = collector.run_until_finished(["free", "held"])
    finally:
        backend.shutdown()
    assert tokens["free"] == [first] and reasons["free"] is FinishReason.STOP
    assert len(tokens["held"]) >= 3 and first not in tokens["held"][:3]


@pytest.mark.parametrize("options", [{}, {"max_prefill_token_num": 5}, {"enable_prefix_caching": True}])
def test_prompt_logprobs_are_the_models_for_every_prompt_token(tiny, tiny_model_dir, options):
    backend, collector = make_backend(tiny_model_dir, **options)
    prompt = PROMPT * 3  # 36 tokens: several 16-token blocks, so a prefix cache could serve them
    firsts = {}
    try:
        for rid in ("warm", "lp"):  # the second would hit the prefix cache if it were allowed
            backend.submit(EngineRequest(rid, prompt, greedy(2, prompt_logprobs=2)))
            while True:
                out = collector.outputs.get(timeout=60)
                firsts.setdefault(out.request_id, out)
                if out.finish_reason is not None:
                    break
    finally:
        backend.shutdown()
    for rid in ("warm", "lp"):
        records = firsts[rid].prompt_logprobs
        assert records is not None and len(records) == len(prompt) and records[0] is None
        for position in range(1, len(prompt)):
            expected = reference_logprobs(tiny, list(prompt[:position]))
            record = records[position]
            assert record.token_id == prompt[position]
            assert record.logprob == pytest.approx(float(expected[prompt[position]]), abs=1e-4)
            assert [t for t, _ in record.top] == expected.topk(2).indices.tolist()
    assert firsts["lp"].num_cached_tokens == 0, "prompt logprobs need the whole prompt computed"


def test_a_request_that_breaks_the_sampler_fails_alone(tiny, tiny_model_dir):
    backend, collector = make_backend(tiny_model_dir)
    engine = backend.engine
    real_sample = engine.sample

    def sample(logits, seqs):
        if any(seq.request_id == "bad" for seq in seqs):
            raise RuntimeError("a sampler bug")
        return real_sample(logits, seqs)

    engine.sample = sample
    try:
        backend.submit(EngineRequest("good", PROMPT, greedy(6)))
        backend.submit(EngineRequest("bad", PROMPT[:5], greedy(6)))
        tokens, reasons = collector.run_until_finished(["good", "bad"])
    finally:
        backend.shutdown()
    assert reasons == {"good": FinishReason.LENGTH, "bad": FinishReason.ERROR}
    assert tokens["good"] == reference_greedy(tiny, PROMPT, 6), "the innocent request is untouched"
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def test_freed_heap_memory_is_trimmed_in_the_background():
    import time

    from lmserve.backends.torch.memory_trim import MemoryTrimmer

    trimmer = MemoryTrimmer(interval_s=0.05)
    assert trimmer.available  # glibc, as on every machine the suite runs on
    trimmer.start()
    deadline = time.monotonic() + 5
    while trimmer.trims < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    trimmer.stop()
    assert trimmer.trims >= 2
    trimmer._thread.join(timeout=1)
    assert not trimmer._thread.is_alive()
