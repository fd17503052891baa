import dataclasses

import pytest

from lmserve.core.types import EngineRequest, GenerationRequest, InvalidRequestError, SamplingParams


@pytest.mark.parametrize(
    "kwargs, param",
    [
        ({"max_tokens": 0}, "max_tokens"),
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": 2.5}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_p": float("nan")}, "top_p"),
        ({"top_k": -1}, "top_k"),
        ({"seed": 1.5}, "seed"),
        ({"min_p": 1.5}, "min_p"),
        ({"repetition_penalty": 0.0}, "repetition_penalty"),
        ({"presence_penalty": 2.5}, "presence_penalty"),
        ({"frequency_penalty": -2.5}, "frequency_penalty"),
        ({"logit_bias": {"x": 1.0}}, "logit_bias"),
        ({"logit_bias": {5: float("inf")}}, "logit_bias"),
    ],
)
def test_sampling_params_errors_name_the_parameter(kwargs, param):
    with pytest.raises(InvalidRequestError) as info:
        SamplingParams(**kwargs)
    assert info.value.param == param
    assert param in info.value.message


def test_greedy_when_temperature_zero_or_top_k_one():
    assert SamplingParams(temperature=0.0).greedy
    assert SamplingParams(top_k=1).greedy
    assert not SamplingParams(temperature=0.7).greedy


def test_empty_prompt_is_rejected():
    with pytest.raises(InvalidRequestError):
        GenerationRequest((), SamplingParams())


def test_logit_bias_is_clamped_to_plus_minus_100_as_lmdeploy_does():
    params = SamplingParams(logit_bias={"5": 500, 6: -1e9, 7: 3})
    assert dict(params.logit_bias) == {5: 100.0, 6: -100.0, 7: 3.0}


def test_the_engine_request_carries_every_field_the_engine_takes_by_name():
    """GenerationRequest.engine_request() copies by EngineRequest's field names: a field the
    engine gains must exist on GenerationRequest, and each value arrives unchanged."""
    engine_fields = {f.name for f in dataclasses.fields(EngineRequest)}
    assert engine_fields <= {f.name for f in dataclasses.fields(GenerationRequest)}
    constraint = object()
    request = GenerationRequest((5, 6), SamplingParams(max_tokens=3), "r-1", stop=("x",), session_key="s",
                                keep_kv=True, constraint=constraint, group_id="g")
    engine = request.engine_request()
    assert {name: getattr(engine, name) for name in engine_fields} == {
        "request_id": "r-1", "prompt_token_ids": (5, 6), "sampling_params": SamplingParams(max_tokens=3),
        "session_key": "s", "keep_kv": True, "constraint": constraint, "group_id": "g"}
