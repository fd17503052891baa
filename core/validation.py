"""The request rules that more than one boundary needs, each written once.

Routes, the bus, sessions and the engine all ask these functions; none of them
spells the rule again. Errors are :class:`InvalidRequestError` naming the
parameter, which the HTTP edge turns into a 400.

Who asks which, and why some rules are asked twice on purpose:

- The context room: frontends ask the bus (:meth:`RequestBus.check_length
  <lmserve.core.bus.RequestBus.check_length>`, :meth:`~lmserve.core.bus.RequestBus.context_room`),
  which pairs the rule with its backend's context length; the bus asks again when it
  admits a request, for callers that did not. The torch engine checks the requests
  it is given as its own guard: a Ray replica or a test fixture submits without a bus.
- Token ids: on the HTTP path each list is checked once, before generating, against
  the tokenizer's vocabulary: a completion's prompt by its route, ``stop_token_ids`` and
  ``logit_bias`` by the generation handler. The engine checks them again against the
  model's vocabulary (it may be padded past the tokenizer's): its guard, as above.
"""

from __future__ import annotations

from typing import Iterable

from lmserve.core.types import InvalidRequestError


def context_room(num_tokens: int, max_model_len: int) -> int:
    """How many tokens may still be generated after ``num_tokens`` (0 or less: none)."""
    return max_model_len - num_tokens


def check_context_room(num_prompt_tokens: int, max_tokens: int | None, max_model_len: int,
                       prompt_param: str = "messages") -> int:
    """The ``max_tokens`` to use, or a clear error when the prompt does not fit.

    :param num_prompt_tokens: tokens the model reads before it writes.
    :param max_tokens: tokens asked for; ``None`` means all the room left in the context.
    :param max_model_len: the context length.
    :param prompt_param: the parameter named when the prompt alone leaves no room.
    :returns: ``max_tokens``, or the room left when it was ``None`` or smaller.
    """
    room = context_room(num_prompt_tokens, max_model_len)
    if room <= 0:
        raise InvalidRequestError(
            f"The prompt has {num_prompt_tokens} tokens, but this model's maximum context "
            f"length is {max_model_len} tokens, which leaves no room to generate.",
            prompt_param,
        )
    if max_tokens is None:
        return room
    # More than the room left is no error (LMDeploy's rule): generation runs until the
    # context is full and ends with finish_reason "length".
    return min(max_tokens, room)


def check_logit_bias_keys(keys: Iterable[str], vocab_size: int) -> None:
    """Raise unless every key of a body's ``logit_bias`` (JSON keys are strings) is a token
    id of this vocabulary, written in ASCII decimal digits; the message names the first that is not."""
    for key in keys:
        if not (key.isascii() and key.isdigit() and int(key) < vocab_size):
            raise InvalidRequestError(f"logit_bias key {key!r} is not a token id of this model.", "logit_bias")


def check_token_ids(token_ids: Iterable[int], vocab_size: int, param: str) -> None:
    """Raise unless every id lies in ``[0, vocab_size)``; the message names the first that does not."""
    for token_id in token_ids:
        if not 0 <= token_id < vocab_size:
            raise InvalidRequestError(
                f"Token id {token_id} is outside the vocabulary [0, {vocab_size}).", param)
