"""The request bus against a scripted backend that steps in its own thread."""

import asyncio
import queue
import threading

import pytest

from lmserve.core.backend import Backend
from lmserve.core.bus import RequestBus
from lmserve.core.types import (
    BackendUnavailableError,
    EngineOutput,
    FinishReason,
    GenerationRequest,
    InvalidRequestError,
    SamplingParams,
)
from lmserve.plugins.tokenizer_files import tokenizer_from_hf_dir


class ScriptedBackend(Backend):
    """Emits a fixed list of token ids, one per step, from its own thread."""

    def __init__(self, script, eos_token_ids=(), max_model_len=64, step_delay=0.0):
        self.script = list(script)
        self.eos_token_ids = tuple(eos_token_ids)
        self.max_model_len = max_model_len
        self.step_delay = step_delay
        self.aborted: list[str] = []
        self.submitted = []
        self._inbox = queue.SimpleQueue()
        self._thread = None

    def start(self, sink):
        self._sink = sink
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def submit(self, request):
        self.submitted.append(request)
        self._inbox.put(("submit", request))

    def abort(self, request_id):
        self._inbox.put(("abort", request_id))

    def shutdown(self):
        self._inbox.put(("stop", None))
        self._thread.join(5)

    def _run(self):
        import time

        while True:
            kind, payload = self._inbox.get()
            if kind == "stop":
                return
            if kind == "abort":
                self.aborted.append(payload)
                continue
            request, params = payload, payload.sampling_params
            for i, token in enumerate(self.script):
                time.sleep(self.step_delay)
                try:
                    kind2, aborted_id = self._inbox.get_nowait()
                    if kind2 == "abort" and aborted_id == request.request_id:
                        self.aborted.append(aborted_id)
                        self._sink([EngineOutput(request.request_id, (), FinishReason.ABORT)])
                        break
                except queue.Empty:
                    pass
                last = i + 1 == len(self.script) or i + 1 == params.max_tokens
                stop = token in self.eos_token_ids and not params.ignore_eos
                reason = FinishReason.STOP if stop else (FinishReason.LENGTH if last else None)
                self._sink([EngineOutput(request.request_id, (token,), reason)])
                if reason is not None:
                    break


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from tiny_tokenizer import write_tiny_tokenizer

    directory = tmp_path_factory.mktemp("tok")
    write_tiny_tokenizer(directory)
    return tokenizer_from_hf_dir(directory)


def _run(coro):
    return asyncio.run(coro)


async def _collect(bus, request):
    return [out async for out in bus.generate(request)]


def test_outputs_text_usage_and_finish(tokenizer):
    text = "héllo 世界 🙂!"
    ids = tokenizer.encode(text, add_bos=False)
    backend = ScriptedBackend(ids)

    async def main():
        bus = RequestBus(backend, tokenizer)
        bus.start()
        outs = await _collect(bus, GenerationRequest((1, 2, 3), SamplingParams(max_tokens=len(ids))))
        bus.shutdown()
        return outs

    outs = _run(main())
    assert "".join(o.text for o in outs) == text
    assert all(o.text for o in outs[:-1]), "no empty deltas before the last output"
    assert all("\ufffd" not in o.text for o in outs)
    assert outs[-1].finish_reason is FinishReason.LENGTH
    assert outs[-1].usage.prompt_tokens == 3
    assert outs[-1].usage.completion_tokens == len(ids)
    assert len({o.request_id for o in outs}) == 1


def test_stop_token_is_counted_but_not_text(tokenizer):
    eos = tokenizer.eos_token_id
    ids = tokenizer.encode("ok", add_bos=False) + [eos]
    backend = ScriptedBackend(ids, eos_token_ids=(eos,))

    async def main():
        bus = RequestBus(backend, tokenizer)
        bus.start()
        params = SamplingParams(max_tokens=10, skip_special_tokens=False)
        outs = await _collect(bus, GenerationRequest((1,), params))
        bus.shutdown()
        return outs

    outs = _run(main())
    assert "".join(o.text for o in outs) == "ok"
    assert outs[-1].finish_reason is FinishReason.STOP
    assert outs[-1].usage.completion_tokens == len(ids)


def test_leaving_early_aborts_in_the_backend(tokenizer):
    backend = ScriptedBackend([65] * 1000, max_model_len=2048, step_delay=0.005)
    finished = []

    class Observer:
        def lmserve_request_started(self, request):
            pass

        def lmserve_request_finished(self, request, output, elapsed_s):
            finished.append(output)

    async def main():
        bus = RequestBus(backend, tokenizer, hooks=Observer())
        bus.start()
        stream = bus.generate(GenerationRequest((1,), SamplingParams(max_tokens=1000)))
        async for _ in stream:
            break
        await stream.aclose()
        await asyncio.sleep(0.1)
        assert bus.num_in_flight == 0
        bus.shutdown()

    _run(main())
    assert backend.aborted == [backend.submitted[0].request_id]
    assert finished and finished[0].finish_reason is FinishReason.ABORT


def test_a_raising_observer_does_not_break_the_request(tokenizer):
    backend = ScriptedBackend(tokenizer.encode("fine", add_bos=False))

    class Raising:
        def lmserve_request_started(self, request):
            raise RuntimeError("observer bug")

        def lmserve_request_finished(self, request, output, elapsed_s):
            raise RuntimeError("observer bug")

    async def main():
        bus = RequestBus(backend, tokenizer, hooks=Raising())
        bus.start()
        outs = await _collect(bus, GenerationRequest((1,), SamplingParams(max_tokens=50)))
        bus.shutdown()
        return outs

    assert "".join(o.text for o in _run(main())) == "fine"


def test_prompt_longer_than_the_context_is_refused(tokenizer):
    backend = ScriptedBackend([65], max_model_len=8)

    async def main():
        bus = RequestBus(backend, tokenizer)
        bus.start()
        try:
            with pytest.raises(InvalidRequestError, match="context length"):
                await _collect(bus, GenerationRequest(tuple(range(8)), SamplingParams(max_tokens=1)))
            assert bus.check_length(4, None) == 4
        finally:
            bus.shutdown()

    _run(main())
    assert backend.submitted == []


def test_max_tokens_past_the_context_runs_until_the_context_is_full(tokenizer):
    """LMDeploy's rule: no error; generation ends with "length" when the context is full."""
    backend = ScriptedBackend([65], max_model_len=8)

    async def main():
        bus = RequestBus(backend, tokenizer)
        bus.start()
        try:
            await _collect(bus, GenerationRequest(tuple(range(4)), SamplingParams(max_tokens=5)))
        finally:
            bus.shutdown()

    _run(main())
    assert len(backend.submitted) == 1  # the engine ends it when the context is full


def test_ids_of_tokens_without_text_ride_with_the_next_delta(tokenizer):
    special = sorted(tokenizer.special_token_ids)[0]
    ids = [special, special] + tokenizer.encode("a🙂b", add_bos=False) + [special]
    backend = ScriptedBackend(ids)

    async def main():
        bus = RequestBus(backend, tokenizer)
        bus.start()
        outs = await _collect(bus, GenerationRequest((1,), SamplingParams(max_tokens=len(ids))))
        bus.shutdown()
        return outs

    outs = _run(main())
    assert [t for o in outs for t in o.token_ids] == ids
    assert "".join(o.text for o in outs) == "a🙂b"


def test_a_stop_string_across_tokens_ends_the_text_and_the_generation(tokenizer):
    ids = tokenizer.encode("one two three four five six", add_bos=False)
    assert len(ids) > 6
    backend = ScriptedBackend(ids + [65] * 200, max_model_len=512, step_delay=0.002)

    async def main():
        bus = RequestBus(backend, tokenizer)
        bus.start()
        try:
            params = SamplingParams(max_tokens=200)
            cut = await _collect(bus, GenerationRequest((1,), params, stop=("ree fo", "zzz")))
            kept = await _collect(bus, GenerationRequest((1,), params, stop=("ree fo",),
                                                         include_stop_str_in_output=True))
            await asyncio.sleep(0.05)
            return cut, kept
        finally:
            bus.shutdown()

    cut, kept = _run(main())
    assert "".join(o.text for o in cut) == "one two th"
    assert "".join(o.text for o in kept) == "one two three fo"
    assert cut[-1].finish_reason is FinishReason.STOP and kept[-1].finish_reason is FinishReason.STOP
    assert cut[-1].usage.completion_tokens < 20, "the generation stopped at the stop string"
    assert len(backend.aborted) == 2, "the engine was told to stop both"


def test_timing_is_reported_on_the_last_output(tokenizer):
    backend = ScriptedBackend(tokenizer.encode("abcdef", add_bos=False), step_delay=0.01)

    async def main():
        bus = RequestBus(backend, tokenizer)
        bus.start()
        outs = await _collect(bus, GenerationRequest((1,), SamplingParams(max_tokens=50)))
        bus.shutdown()
        return outs

    outs = _run(main())
    assert all(o.timing is None for o in outs[:-1])
    timing = outs[-1].timing
    assert 0 < timing.time_to_first_token <= timing.e2e_latency
    assert len(timing.inter_token) == outs[-1].usage.completion_tokens - 1
    assert all(gap >= 0 for gap in timing.inter_token)


def test_a_stop_string_in_the_last_delta_still_reports_stop(tokenizer):
    ids = tokenizer.encode("abc END", add_bos=False)
    backend = ScriptedBackend(ids)  # the script ends with the stop string: LENGTH from the engine

    async def main():
        bus = RequestBus(backend, tokenizer)
        bus.start()
        try:
            return await _collect(bus, GenerationRequest((1,), SamplingParams(max_tokens=len(ids)), stop=("END",)))
        finally:
            bus.shutdown()

    outs = _run(main())
    assert "".join(o.text for o in outs) == "abc "
    assert outs[-1].finish_reason is FinishReason.STOP


def test_a_dead_backend_refuses_at_once(tokenizer):
    class Dead(ScriptedBackend):
        def is_healthy(self):
            return False

    backend = Dead([65])

    async def main():
        bus = RequestBus(backend, tokenizer)
        bus.start()
        try:
            with pytest.raises(BackendUnavailableError):
                await _collect(bus, GenerationRequest((1,), SamplingParams(max_tokens=1)))
        finally:
            bus.shutdown()

    _run(main())
    assert backend.submitted == [], "nothing reaches a dead engine"


def test_the_bus_pairs_the_request_rules_with_its_backends_numbers(tokenizer):
    """Frontends ask the bus, which alone joins a request with the backend's context length
    and EOS ids; the engine request it submits carries the request's fields."""
    bus = RequestBus(ScriptedBackend([65], eos_token_ids=(2, 7), max_model_len=8), tokenizer)
    assert bus.context_room(6) == 2 and bus.context_room(9) == -1
    assert bus.check_length(4, None) == 4 and bus.check_length(4, 9) == 4
    with pytest.raises(InvalidRequestError) as info:
        bus.check_length(8, 1, prompt_param="prompt")
    assert info.value.param == "prompt"
    assert bus.stop_ids(SamplingParams(stop_token_ids=(5,))) == {2, 5, 7}
    assert bus.stop_ids(SamplingParams(stop_token_ids=(5,), ignore_eos=True)) == {5}


def test_the_submitted_engine_request_is_the_admitted_request(tokenizer):
    backend = ScriptedBackend([65, 66])

    async def main():
        bus = RequestBus(backend, tokenizer)
        bus.start()
        try:
            await _collect(bus, GenerationRequest((1, 2), SamplingParams(max_tokens=2), session_key="s",
                                                  keep_kv=True, group_id="g"))
        finally:
            bus.shutdown()

    _run(main())
    [submitted] = backend.submitted
    assert submitted.request_id and submitted.prompt_token_ids == (1, 2)
    assert (submitted.session_key, submitted.keep_kv, submitted.group_id) == ("s", True, "g")
