"""The request rules that live once: context room, vocabulary, stop ids."""

import pytest

from lmserve.core.types import InvalidRequestError, SamplingParams
from lmserve.core.validation import check_context_room, check_logit_bias_keys, check_token_ids, context_room


def test_context_room_is_max_tokens_when_it_fits_and_the_rest_of_the_context_when_unset():
    assert check_context_room(4, 3, 8) == 3
    assert check_context_room(4, 4, 8) == 4
    assert check_context_room(4, None, 8) == 4


def test_a_prompt_that_fills_the_context_names_the_prompt_parameter():
    with pytest.raises(InvalidRequestError, match="context length is 8") as info:
        check_context_room(8, None, 8)
    assert info.value.param == "messages"
    with pytest.raises(InvalidRequestError) as info:
        check_context_room(9, 1, 8, prompt_param="prompt")
    assert info.value.param == "prompt"


def test_max_tokens_past_the_context_is_clipped_to_the_room_left():
    """LMDeploy's rule: no error, generation runs until the context is full."""
    assert check_context_room(4, 5, 8) == 4
    assert check_context_room(4, 3, 8) == 3
    assert check_context_room(4, None, 8) == 4


def test_token_ids_outside_the_vocabulary_are_named():
    check_token_ids([0, 5, 9], 10, "prompt")
    for bad in (10, -1):
        with pytest.raises(InvalidRequestError, match=rf"Token id {bad} is outside the vocabulary \[0, 10\)") as info:
            check_token_ids([1, bad, 99], 10, "tokens")
        assert info.value.param == "tokens"


def test_stop_ids_are_the_stop_token_ids_plus_eos_unless_ignore_eos():
    eos = (2, 7)
    assert SamplingParams(stop_token_ids=(5,)).stop_ids(eos) == {2, 5, 7}
    assert SamplingParams(stop_token_ids=(5,), ignore_eos=True).stop_ids(eos) == {5}
    assert SamplingParams().stop_ids(()) == frozenset()


def test_context_room_counts_what_is_left_after_the_tokens_so_far():
    assert context_room(6, 8) == 2
    assert context_room(8, 8) == 0
    assert context_room(9, 8) == -1


def test_logit_bias_keys_must_be_decimal_token_ids_of_the_vocabulary():
    check_logit_bias_keys(["0", "9"], 10)
    for bad in ("10", "abc", "+5", " 5", "٣"):
        with pytest.raises(InvalidRequestError) as info:
            check_logit_bias_keys(["1", bad], 10)
        assert info.value.param == "logit_bias"
        assert info.value.message == f"logit_bias key {bad!r} is not a token id of this model."
