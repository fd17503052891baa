"""The model's own sampling defaults: what a request that leaves a sampling field unset gets.

A model's makers say how it samples best: Qwen3's ``generation_config.json`` has
temperature 0.6, top_p 0.95, top_k 20. vLLM and LMDeploy (``--generation-config auto``)
apply those to the fields a request leaves unset; so does lmserve. A request's own
value always wins, and a field neither the request nor the model sets keeps
:class:`~lmserve.core.types.SamplingParams`' default (1.0, 1.0, off, ...).

``--generation-config`` (options key ``generation_config``) says where they come from
(:func:`resolve_sampling_defaults`):

- ``auto`` (the default): the model's own, read by :hook:`lmserve_sampling_defaults`
  (the built-in reads an HF directory's ``generation_config.json`` and a GGUF file's
  ``general.sampling.*`` metadata);
- a directory: the ``generation_config.json`` in it, read by the same hook;
- ``none``, ``vllm`` or ``lmdeploy``: no model defaults, this server's own.

Only the fields of :data:`SAMPLING_DEFAULT_FIELDS` are taken (vLLM's list); a value
a request could not send (temperature -1) is skipped with a warning, never a crash.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from lmserve.core.plugins import call_safely
from lmserve.core.types import InvalidRequestError, SamplingParams

if TYPE_CHECKING:  # imported for annotations only
    import pluggy

    from lmserve.core.config import ServeConfig
    from lmserve.core.model_source import ModelSource

logger = logging.getLogger(__name__)

#: The fields a model may set defaults for, by :class:`SamplingParams`' names
#: (``max_tokens`` is HF's ``max_new_tokens``).
SAMPLING_DEFAULT_FIELDS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "max_tokens")
#: ``--generation-config`` values that turn the model's defaults off (``lmdeploy`` and
#: ``vllm`` name those servers' own defaults; lmserve's are SamplingParams').
GENERATION_CONFIG_OFF = ("none", "vllm", "lmdeploy")
#: The file ``--generation-config DIR`` names the folder of (HF's name).
GENERATION_CONFIG_FILE = "generation_config.json"


@dataclass(frozen=True)
class SamplingDefaults:
    """Default sampling values for requests that leave them unset, and where they come from.

    ``values`` maps names of :data:`SAMPLING_DEFAULT_FIELDS` to values a request could
    send; the constructor refuses anything else (``ValueError``), so a plugin that
    read a file builds one with :meth:`from_file`, which skips what it cannot use.
    """

    values: Mapping[str, Any] = field(default_factory=dict)
    #: Where the values come from, for the startup line: "the model's generation_config.json".
    origin: str = "nowhere"

    def __post_init__(self) -> None:
        for name, value in self.values.items():
            problem = _problem(name, value)
            if problem:
                raise ValueError(f"SamplingDefaults: {problem}")
        object.__setattr__(self, "values", MappingProxyType(dict(self.values)))

    @classmethod
    def from_file(cls, values: Mapping[str, Any], origin: str,
                  warn: Callable[[str], None] = logger.warning) -> SamplingDefaults:
        """The usable ``values`` (by SamplingParams' names) read from ``origin``: a name
        outside :data:`SAMPLING_DEFAULT_FIELDS` or a value out of range is skipped, with
        ``warn`` saying so for the latter; None values are absent ones."""
        usable = {}
        for name, value in values.items():
            if name not in SAMPLING_DEFAULT_FIELDS or value is None:
                continue
            problem = _problem(name, value)
            if problem:
                warn(f"{origin}: {problem}; this default is skipped.")
            else:
                usable[name] = value
        return cls(usable, origin)

    def describe(self) -> str:
        """The startup line: ``sampling defaults from ORIGIN: temperature=0.6, top_p=0.95``."""
        if not self.values:
            return f"sampling defaults: none from {self.origin}; requests get this server's own"
        shown = ", ".join(f"{name}={self.values[name]}" for name in SAMPLING_DEFAULT_FIELDS if name in self.values)
        return f"sampling defaults from {self.origin}: {shown}"


def _problem(name: str, value: Any) -> str | None:
    """Why ``value`` cannot be the default of ``name``, or None: SamplingParams' own check."""
    if name not in SAMPLING_DEFAULT_FIELDS:
        return f"{name} is not a sampling default ({', '.join(SAMPLING_DEFAULT_FIELDS)} are)"
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return f"{name} must be a number, got {value!r}"
    try:
        SamplingParams(**{name: value})
    except InvalidRequestError as exc:
        return exc.message.replace("max_tokens", "max_new_tokens") if name == "max_tokens" else exc.message
    return None


def resolve_sampling_defaults(pm: pluggy.PluginManager, config: ServeConfig, source: ModelSource) -> SamplingDefaults:
    """The sampling defaults ``--generation-config`` asks for (see the module's docstring).

    Raises ``ValueError`` (the CLI exits 2, before the weights load) when DIR is not a
    folder holding ``generation_config.json``.
    """
    choice = config.options.get("generation_config") or "auto"
    if choice in GENERATION_CONFIG_OFF:
        return SamplingDefaults(origin=f"--generation-config {choice}")
    directory = None
    if choice != "auto":
        directory = Path(choice).expanduser()
        if not (directory / GENERATION_CONFIG_FILE).is_file():
            what = "is not a folder" if not directory.is_dir() else f"has no {GENERATION_CONFIG_FILE}"
            raise ValueError(f"--generation-config {choice}: {what} (give auto, none, vllm, lmdeploy, or a "
                             f"folder holding {GENERATION_CONFIG_FILE}).")
    found = call_safely(pm, "lmserve_sampling_defaults", source=source, directory=directory, config=config)
    if found is None:
        return SamplingDefaults(origin="the model" if directory is None else str(directory))
    return found
