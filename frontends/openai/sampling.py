"""How a generation request samples and when it stops, built in one place for
every generation route (chat, completions, interactive).

- :func:`sampling_params`: the body's sampling values as
  :class:`~lmserve.core.types.SamplingParams`; a value the body left out (None)
  takes SamplingParams' default, and an invalid one is a 400 naming the body's
  parameter.
- :func:`checked_stop_strings`: a body's ``stop`` as strings, within bounds.
- The chat template's stop words: one of a single token ends every request, like
  EOS (:func:`with_template_stop_token_ids`); a longer one ends a request whose
  prompt the template rendered, as its own ``stop`` strings do
  (:func:`with_template_stop_strings`). ``ignore_eos`` turns both off.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Union

from lmserve.core.types import InvalidRequestError, SamplingParams
from lmserve.frontends.openai.errors import APIError
from lmserve.frontends.openai.protocol import MAX_STOP_STRING_LENGTH, MAX_STOP_STRINGS
from lmserve.frontends.openai.state import ServerState



def sampling_params(
    max_tokens: int,
    *,
    temperature: float | None = None,
    top_p: float | None = None,
    top_k: int | None = None,
    min_p: float | None = None,
    repetition_penalty: float | None = None,
    presence_penalty: float | None = None,
    frequency_penalty: float | None = None,
    logit_bias: Mapping | None = None,
    seed: int | None = None,
    stop_token_ids: tuple[int, ...] = (),
    ignore_eos: bool = False,
    skip_special_tokens: bool = True,
    min_tokens: int | None = None,
    logprobs: int | None = None,
    prompt_logprobs: int | None = None,
    body_names: Mapping[str, str] | None = None,
) -> SamplingParams:
    """The request's :class:`SamplingParams`; None: SamplingParams' default.

    Raises :class:`APIError` 400 when a value is out of range, naming the parameter
    as the body spells it: ``body_names`` maps SamplingParams' field names to the
    body's where they differ (interactive's ``min_new_tokens``, chat's ``top_logprobs``).
    """
    given = {
        "temperature": temperature,
        "top_p": top_p,
        "top_k": top_k,
        "min_p": min_p,
        "repetition_penalty": repetition_penalty,
        "presence_penalty": presence_penalty,
        "frequency_penalty": frequency_penalty,
        "logit_bias": logit_bias,
        "seed": seed,
        "min_tokens": min_tokens,
        "logprobs": logprobs,
        "prompt_logprobs": prompt_logprobs,
    }
    if min_tokens is not None and min_tokens > max_tokens:
        # max_tokens may have been cut to the room left in the context (LMDeploy's rule:
        # no error): min_tokens follows it down; so does one above the request's own max_tokens.
        given["min_tokens"] = max_tokens
    try:
        return SamplingParams(
            max_tokens=max_tokens,
            stop_token_ids=stop_token_ids,
            ignore_eos=ignore_eos,
            skip_special_tokens=skip_special_tokens,
            **{name: value for name, value in given.items() if value is not None},
        )
    except InvalidRequestError as exc:
        param = (body_names or {}).get(exc.param, exc.param)
        raise APIError(400, exc.message, param) from exc


def checked_stop_strings(stop: Union[str, list[str], None]) -> tuple[str, ...]:
    """A body's ``stop`` (None, a string or a list) as strings, within the bounds
    every generation route keeps."""
    stop = () if stop is None else (stop,) if isinstance(stop, str) else tuple(stop)
    if len(stop) > MAX_STOP_STRINGS or any(len(s) > MAX_STOP_STRING_LENGTH for s in stop):
        raise APIError(400, f"stop: at most {MAX_STOP_STRINGS} strings of at most "
                       f"{MAX_STOP_STRING_LENGTH} characters each.", "stop")
    return stop


def with_template_stop_token_ids(state: ServerState, stop_token_ids: tuple[int, ...], *,
                                 ignore_eos: bool) -> tuple[int, ...]:
    """``stop_token_ids`` and the template's stop words of one token (they end a turn
    like EOS does), unless ``ignore_eos``."""
    if ignore_eos:
        return stop_token_ids
    return stop_token_ids + state.default_stop_token_ids


def with_template_stop_strings(state: ServerState, stop: tuple[str, ...], *, ignore_eos: bool) -> tuple[str, ...]:
    """``stop`` and the template's stop words of several tokens not already in it, unless
    ``ignore_eos``. Only for a prompt the chat template rendered: a completion's prompt
    is not the template's, nor are its stop words."""
    if ignore_eos:
        return stop
    return stop + tuple(word for word in state.default_stop_strings if word not in stop)
