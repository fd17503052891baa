"""RequestStream: one request's engine outputs become GenerationOutputs."""

import pytest

from lmserve.core.request_stream import RequestStream
from lmserve.core.types import EngineOutput, FinishReason, GenerationRequest, SamplingParams, TokenLogprob
from lmserve.plugins.tokenizer_files import tokenizer_from_hf_dir
from tiny_tokenizer import write_tiny_tokenizer


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tok")
    write_tiny_tokenizer(directory)
    return tokenizer_from_hf_dir(directory)


def _stream(tokenizer, stop=(), eos=(), **params) -> RequestStream:
    request = GenerationRequest((1, 2, 3), SamplingParams(**{"max_tokens": 16, **params}), request_id="r",
                                stop=tuple(stop))
    return RequestStream(request, tokenizer, request.sampling_params.stop_ids(eos))


def _push_all(stream, outputs):
    return [out for out in map(stream.push, outputs) if out is not None]


def test_deltas_add_up_to_the_text_and_the_last_carries_usage_and_timing(tokenizer):
    ids = tokenizer.encode("hello world", add_bos=False)
    stream = _stream(tokenizer)
    engine = [EngineOutput("r", (token,)) for token in ids[:-1]] + [EngineOutput("r", tuple(ids[-1:]), FinishReason.LENGTH)]
    outs = _push_all(stream, engine)
    assert "".join(out.text for out in outs) == "hello world"
    assert [t for out in outs for t in out.token_ids] == ids
    assert outs[-1].finish_reason is FinishReason.LENGTH and stream.finished
    assert (outs[-1].usage.prompt_tokens, outs[-1].usage.completion_tokens) == (3, len(ids))
    assert outs[-1].timing is not None and outs[-1].timing.first_token is not None
    assert all(out.timing is None for out in outs[:-1])


def test_the_stop_token_is_not_text_but_its_id_is_reported(tokenizer):
    ids = tokenizer.encode("hi", add_bos=False)
    eos = tokenizer.encode("!", add_bos=False)[0]
    stream = _stream(tokenizer, eos=(eos,))
    outs = _push_all(stream, [EngineOutput("r", tuple(ids)), EngineOutput("r", (eos,), FinishReason.STOP)])
    assert "".join(out.text for out in outs) == "hi"
    assert outs[-1].token_ids == (eos,)


def test_a_stop_string_finishes_the_stream_before_the_engine_does(tokenizer):
    ids = tokenizer.encode("one two three", add_bos=False)
    stream = _stream(tokenizer, stop=["two"])
    outs = []
    for token in ids:
        out = stream.push(EngineOutput("r", (token,)))
        if out is not None:
            outs.append(out)
        if stream.finished:
            break
    assert outs[-1].finish_reason is FinishReason.STOP
    assert "".join(out.text for out in outs) == "one "


def test_ids_without_text_and_their_logprobs_ride_with_the_next_delta(tokenizer):
    emoji = tokenizer.encode("🙂", add_bos=False)
    assert len(emoji) > 1, "the test needs a character split over tokens"
    stream = _stream(tokenizer, logprobs=0)
    outs = []
    for i, token in enumerate(emoji):
        finish = FinishReason.LENGTH if i == len(emoji) - 1 else None
        out = stream.push(EngineOutput("r", (token,), finish, logprobs=(TokenLogprob(token, -1.0),)))
        assert (out is None) == (finish is None)
        if out is not None:
            outs.append(out)
    assert outs[0].text == "🙂" and outs[0].token_ids == tuple(emoji)
    assert [lp.token_id for lp in outs[0].logprobs] == emoji


def test_an_abandoned_stream_ends_in_abort_with_the_tokens_counted(tokenizer):
    stream = _stream(tokenizer)
    stream.push(EngineOutput("r", tuple(tokenizer.encode("ab", add_bos=False))))
    last = stream.abandoned()
    assert last.finish_reason is FinishReason.ABORT and stream.finished
    assert last.usage.completion_tokens == stream.num_output_tokens > 0
