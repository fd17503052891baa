"""sampling_params reads SamplingParams' own field list from a body: none is forgotten."""

import dataclasses
from types import SimpleNamespace

import pytest

from lmserve.core.types import SamplingParams
from lmserve.frontends.http.errors import APIError
from lmserve.frontends.http.sampling import sampling_params

#: A value other than the default for every field.
CHANGED = {"max_tokens": 9, "temperature": 0.5, "top_p": 0.9, "top_k": 3, "min_p": 0.1, "repetition_penalty": 1.2,
           "presence_penalty": 0.5, "frequency_penalty": -0.5, "logit_bias": {5: 1.0}, "seed": 7,
           "stop_token_ids": (4,), "ignore_eos": True, "skip_special_tokens": False, "min_tokens": 2,
           "logprobs": 3, "prompt_logprobs": 1}


def test_every_field_is_read_from_the_body():
    fields = {f.name for f in dataclasses.fields(SamplingParams)}
    assert set(CHANGED) == fields, "CHANGED must name every field, with a value that is not its default"
    assert all(SamplingParams(**{name: value}) != SamplingParams() for name, value in CHANGED.items())
    body = SimpleNamespace(**{**CHANGED, "max_tokens": 100})  # the room-checked max_tokens wins
    assert sampling_params(body, 9) == SamplingParams(**CHANGED)


def test_a_field_the_body_lacks_or_leaves_none_takes_the_default():
    assert sampling_params(SimpleNamespace(temperature=None), 5) == SamplingParams(max_tokens=5)


def test_overrides_win_even_when_none_and_body_names_rename_reads_and_errors():
    body = SimpleNamespace(seed=3, logprobs=True, min_new_tokens=2, top_logprobs=99)
    params = sampling_params(body, 5, seed=4, logprobs=None, body_names={"min_tokens": "min_new_tokens"})
    assert (params.seed, params.logprobs, params.min_tokens) == (4, None, 2)
    with pytest.raises(APIError) as info:
        sampling_params(body, 5, logprobs=99, body_names={"logprobs": "top_logprobs"})
    assert info.value.param == "top_logprobs"


def test_min_tokens_follows_max_tokens_down():
    assert sampling_params(SimpleNamespace(min_tokens=8), 5).min_tokens == 5
