"""The messages that cross lmserve's boundaries.

Three request shapes: small frozen messages cross boundaries
(:class:`EngineRequest` into a backend, :class:`EngineOutput` out of it,
:class:`GenerationOutput` out of the bus); the engine alone owns its mutable
per-request state; the frontends never see it. Plain dataclasses: pydantic
lives at the HTTP edge only.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field, fields
from types import MappingProxyType
from typing import TYPE_CHECKING, Mapping

if TYPE_CHECKING:  # annotations only
    from lmserve.core.structured_output import TokenConstraint


class FinishReason(str, enum.Enum):
    """Why a generation ended, spelled as OpenAI's ``finish_reason``."""

    STOP = "stop"  # an end-of-sequence / stop token or a stop string
    LENGTH = "length"  # max_tokens or the session length was reached
    ABORT = "abort"  # cancelled by the client or by shutdown
    ERROR = "error"  # the backend failed this request


class InvalidRequestError(ValueError):
    """Bad input from a client; ``param`` names the offending parameter."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param


class BackendUnavailableError(RuntimeError):
    """The backend cannot take requests (its engine stopped); a 503 at the HTTP edge."""


class SessionLostError(RuntimeError):
    """An interactive session's keys and values are gone with the engine that held them
    (a replica that stopped); the session cannot go on. A 410 at the HTTP edge."""


@dataclass(frozen=True)
class SamplingParams:
    """How to pick the next token and when to stop.

    Validated on construction; errors name the parameter, so the HTTP layer
    can turn them into a 400 with ``param`` set.
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 means "all tokens"
    min_p: float = 0.0  # 0 means off
    repetition_penalty: float = 1.0  # over prompt and output; 1 means off
    presence_penalty: float = 0.0  # over the output
    frequency_penalty: float = 0.0  # over the output
    logit_bias: Mapping[int, float] = field(default_factory=dict)
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    min_tokens: int = 0  # EOS and stop tokens are not sampled before this many output tokens
    #: Return the sampled token's log-probability and this many top alternatives
    #: (None: no log-probabilities).
    logprobs: int | None = None
    #: The same for every prompt token after the first (None: off; such a request
    #: computes its whole prompt, never taking it from the prefix cache).
    prompt_logprobs: int | None = None

    #: The most top alternatives a request may ask for.
    MAX_LOGPROBS = 20

    def __post_init__(self) -> None:
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise InvalidRequestError(
                f"max_tokens must be at least 1, got {self.max_tokens!r}.", "max_tokens"
            )
        if not (isinstance(self.temperature, (int, float)) and 0.0 <= self.temperature <= 2.0):
            raise InvalidRequestError(
                f"temperature must be in [0, 2], got {self.temperature!r}.", "temperature"
            )
        if not (isinstance(self.top_p, (int, float)) and 0.0 < self.top_p <= 1.0) or math.isnan(
            self.top_p
        ):
            raise InvalidRequestError(f"top_p must be in (0, 1], got {self.top_p!r}.", "top_p")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise InvalidRequestError(
                f"top_k must be a non-negative integer (0 disables it), got {self.top_k!r}.",
                "top_k",
            )
        if not (_is_number(self.min_p) and 0.0 <= self.min_p <= 1.0):
            raise InvalidRequestError(f"min_p must be in [0, 1], got {self.min_p!r}.", "min_p")
        # Any positive value, as LMDeploy takes (below 1 favours repeats); the
        # sampler clamps it to what float32 logits survive.
        if not (_is_number(self.repetition_penalty) and 0.0 < self.repetition_penalty < math.inf):
            raise InvalidRequestError(
                f"repetition_penalty must be a positive number, got {self.repetition_penalty!r}.",
                "repetition_penalty",
            )
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not (_is_number(value) and -2.0 <= value <= 2.0):
                raise InvalidRequestError(f"{name} must be in [-2, 2], got {value!r}.", name)
        bias = {}
        for token, value in dict(self.logit_bias).items():
            # An int, or its ASCII decimal digits (not " 5", "+5", "5_0" or other scripts' digits).
            if isinstance(token, str) and token.isascii() and token.isdigit():
                token_id = int(token)
            elif isinstance(token, int) and not isinstance(token, bool):
                token_id = token
            else:
                raise InvalidRequestError(f"logit_bias keys must be token ids, got {token!r}.", "logit_bias")
            if not (_is_number(value) and math.isfinite(value)):
                raise InvalidRequestError(
                    f"logit_bias values must be numbers, got {value!r} for token {token_id}.", "logit_bias")
            bias[token_id] = min(max(float(value), -100.0), 100.0)  # clamped, as LMDeploy does
        object.__setattr__(self, "logit_bias", MappingProxyType(bias))
        if self.seed is not None and not isinstance(self.seed, int):
            raise InvalidRequestError(f"seed must be an integer, got {self.seed!r}.", "seed")
        if not isinstance(self.min_tokens, int) or not 0 <= self.min_tokens <= self.max_tokens:
            raise InvalidRequestError(
                f"min_tokens must be in [0, max_tokens={self.max_tokens}], got {self.min_tokens!r}.", "min_tokens"
            )
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, int) and 0 <= value <= self.MAX_LOGPROBS):
                raise InvalidRequestError(f"{name} must be in [0, {self.MAX_LOGPROBS}], got {value!r}.", name)
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1

    def stop_ids(self, eos_token_ids) -> frozenset[int]:
        """The ids that end this generation: ``stop_token_ids``, plus the model's
        EOS ids unless ``ignore_eos``. Every place that asks "did it stop?" asks this."""
        if self.ignore_eos:
            return frozenset(self.stop_token_ids)
        return frozenset(self.stop_token_ids).union(eos_token_ids)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isnan(value)


@dataclass(frozen=True)
class GenerationRequest:
    """What a frontend hands to the bus: token ids plus how to sample them.

    Stop strings are the bus's business (they are found in the decoded text),
    so they travel here rather than in :class:`SamplingParams`.
    """

    prompt_token_ids: tuple[int, ...]
    sampling_params: SamplingParams
    request_id: str = ""  # the bus assigns one when empty
    stop: tuple[str, ...] = ()  # end the text before the first of these
    include_stop_str_in_output: bool = False
    #: An interactive session's key: see :class:`EngineRequest`.
    session_key: str | None = None
    keep_kv: bool = False
    #: Structured output: the grammar state this generation's tokens must follow
    #: (one per generation: it is stateful). See :mod:`lmserve.core.structured_output`.
    constraint: TokenConstraint | None = field(default=None, compare=False)
    #: The choices of one API request share it: see :class:`EngineRequest`.
    group_id: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "prompt_token_ids", tuple(self.prompt_token_ids))
        if not self.prompt_token_ids:
            raise InvalidRequestError("The prompt is empty: nothing to generate from.", "prompt")
        object.__setattr__(self, "stop", tuple(self.stop))
        if any(not isinstance(stop, str) or not stop for stop in self.stop):
            raise InvalidRequestError("Stop strings must be non-empty strings.", "stop")

    def engine_request(self) -> EngineRequest:
        """What of this request the backend sees: every :class:`EngineRequest` field, taken
        by name (a field added there is carried without a copy to keep in step)."""
        return EngineRequest(**{f.name: getattr(self, f.name) for f in fields(EngineRequest)})


@dataclass(frozen=True)
class EngineRequest:
    """What the bus submits to a backend: only ids cross into the engine."""

    request_id: str
    prompt_token_ids: tuple[int, ...]
    sampling_params: SamplingParams
    #: An interactive session's key. The keys and values kept under it (by an
    #: earlier request with ``keep_kv``) are reused for the longest prefix of
    #: this prompt they match; the rest is computed.
    session_key: str | None = None
    #: Keep this request's keys and values under ``session_key`` when it
    #: finishes (replacing what was kept), until
    #: :meth:`~lmserve.core.backend.Backend.release_session` or memory pressure.
    keep_kv: bool = False
    #: Only tokens this allows are sampled; it follows each sampled token (see
    #: :mod:`lmserve.core.structured_output`). The request ends when it is finished.
    constraint: TokenConstraint | None = field(default=None, compare=False)
    #: The generations of one API request (its choices and prompts) share it; the
    #: scheduler shares the batch and the prefill budget fairly among groups, not
    #: among generations. None: the request is a group of its own.
    group_id: str | None = None


@dataclass(frozen=True)
class TokenLogprob:
    """A generated token's log-probability under the model, with the top alternatives."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()  # (token id, logprob), most likely first


@dataclass(frozen=True)
class EngineOutput:
    """New token ids of one request after one engine step.

    ``finish_reason`` is set on the last output of a request; ``error`` holds a
    message when the backend failed it.
    """

    request_id: str
    new_token_ids: tuple[int, ...]
    finish_reason: FinishReason | None = None
    error: str | None = None
    #: Prompt tokens served from the prefix cache (set on every output; stable once known).
    num_cached_tokens: int = 0
    #: One per new token when the request asked for log-probabilities.
    logprobs: tuple[TokenLogprob, ...] | None = None
    #: With ``prompt_logprobs``, on the output of the first new token: one per
    #: prompt token, None for the first (nothing predicts it).
    prompt_logprobs: tuple[TokenLogprob | None, ...] | None = None


@dataclass(frozen=True)
class TokenUsage:
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0  # prompt tokens whose KV came from the prefix cache

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass(frozen=True)
class RequestTiming:
    """When a request's outputs reached the bus (``time.monotonic()`` seconds)."""

    arrival: float
    first_token: float | None  # None: no token came
    finished: float
    #: Seconds between consecutive outputs after the first (one per engine step).
    inter_token: tuple[float, ...] = ()

    @property
    def time_to_first_token(self) -> float | None:
        return None if self.first_token is None else self.first_token - self.arrival

    @property
    def e2e_latency(self) -> float:
        return self.finished - self.arrival


@dataclass(frozen=True)
class GenerationOutput:
    """What the bus yields to a frontend: a text delta and its token ids.

    ``text`` never ends inside a UTF-8 character. The last output of a request
    carries ``finish_reason`` (and ``error`` when it failed).
    """

    request_id: str
    text: str
    token_ids: tuple[int, ...]
    usage: TokenUsage
    finish_reason: FinishReason | None = None
    error: str | None = None
    extras: dict = field(default_factory=dict)
    #: Set on the last output only.
    timing: RequestTiming | None = None
    #: One per id in ``token_ids`` when the request asked for log-probabilities.
    logprobs: tuple[TokenLogprob, ...] | None = None
    #: With ``prompt_logprobs``, on the first output: one per prompt token (None first).
    prompt_logprobs: tuple[TokenLogprob | None, ...] | None = None
