"""How a generation request samples and when it stops, built in one place for
every generation route (chat, completions, interactive).

- :func:`sampling_params`: the body's sampling values as
  :class:`~lmserve.core.types.SamplingParams`, read field by field from the
  dataclass's own list; a value the body left out (None) takes the model's
  default (``--generation-config``: :mod:`lmserve.core.sampling_defaults`) where
  the route passes them, else SamplingParams' default, and an invalid one is a
  400 naming the body's parameter.
- :func:`checked_stop_strings`: a body's ``stop`` as strings, within bounds.
- The chat template's stop words: one of a single token ends every request, like
  EOS (:func:`with_template_stop_token_ids`); a longer one ends a request whose
  prompt the template rendered, as its own ``stop`` strings do
  (:func:`with_template_stop_strings`). ``ignore_eos`` turns both off.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import fields
from types import MappingProxyType
from typing import Any, Union

from lmserve.core.types import InvalidRequestError, SamplingParams
from lmserve.frontends.http.errors import APIError
from lmserve.frontends.http.protocol import MAX_STOP_STRING_LENGTH, MAX_STOP_STRINGS
from lmserve.frontends.http.state import ServerState

#: SamplingParams' fields, in its order: what :func:`sampling_params` reads from a body.
SAMPLING_FIELDS = tuple(f.name for f in fields(SamplingParams))


def sampling_params(body, max_tokens: int, *, body_names: Mapping[str, str] | None = None,
                    defaults: Mapping[str, Any] = MappingProxyType({}), **overrides) -> SamplingParams:
    """The request's :class:`SamplingParams`, every field read from ``body``.

    Each field of SamplingParams (the one list of them) is read from the body
    attribute of the same name, or the one ``body_names`` maps it to where the body
    spells it otherwise (interactive's ``min_new_tokens``); ``overrides`` give the
    values the route decided (``stop_token_ids`` with the template's, a choice's
    ``seed``, chat's ``logprobs``). ``max_tokens`` is the room-checked value. A value
    that is None, or a field the body lacks, takes its value in ``defaults`` (the
    model's sampling defaults, :attr:`ServerState.sampling_defaults`), else
    SamplingParams' default.

    Raises :class:`APIError` 400 when a value is out of range, naming the parameter
    as the body spells it (``body_names`` again: chat's ``logprobs`` is its ``top_logprobs``).
    """
    body_names = body_names or {}
    overrides["max_tokens"] = max_tokens
    given = {}
    for name in SAMPLING_FIELDS:
        value = overrides[name] if name in overrides else getattr(body, body_names.get(name, name), None)
        if value is None:
            value = defaults.get(name)
        if value is not None:
            given[name] = value
    if given.get("min_tokens", 0) > max_tokens:
        # max_tokens may have been cut to the room left in the context (LMDeploy's rule:
        # no error): min_tokens follows it down; so does one above the request's own max_tokens.
        given["min_tokens"] = max_tokens
    try:
        return SamplingParams(**given)
    except InvalidRequestError as exc:
        raise APIError(400, exc.message, body_names.get(exc.param, exc.param)) from exc


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
