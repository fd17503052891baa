"""The built-in :hook:`lmserve_sampling_defaults`: a model's own sampling defaults.

- An HF directory (a hub cache snapshot is one): its ``generation_config.json``,
  the fields vLLM takes from it: ``temperature``, ``top_p``, ``top_k``, ``min_p``,
  ``repetition_penalty`` and ``max_new_tokens`` (a request's default ``max_tokens``).
  ``do_sample`` is not read, as neither vLLM nor LMDeploy reads it: under HF
  transformers ``do_sample: false`` means greedy, here a request samples with the
  values above unless it sends ``temperature: 0`` (a warning says so at startup).
- A GGUF file: the ``general.sampling.*`` keys llama.cpp's converter writes from
  the same file (``temp``, ``top_p``, ``top_k``, ``min_p``, ``penalty_repeat``);
  GGUF has no key for max_new_tokens. The rest (mirostat, xtc, penalty_last_n,
  sequence) are llama.cpp's samplers, which lmserve does not have: not read.
- ``--generation-config DIR``: the ``generation_config.json`` in DIR, for any model.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from lmserve.core import hookimpl
from lmserve.core.model_source import ModelSource
from lmserve.core.sampling_defaults import GENERATION_CONFIG_FILE, SamplingDefaults

logger = logging.getLogger(__name__)

#: generation_config.json's names -> SamplingParams' names (vLLM's list).
HF_NAMES = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "min_p": "min_p",
            "repetition_penalty": "repetition_penalty", "max_new_tokens": "max_tokens"}
#: GGUF keys (``gguf.Keys.General.SAMPLING_*``) -> SamplingParams' names.
GGUF_KEYS = {"general.sampling.temp": "temperature", "general.sampling.top_p": "top_p",
             "general.sampling.top_k": "top_k", "general.sampling.min_p": "min_p",
             "general.sampling.penalty_repeat": "repetition_penalty"}


@hookimpl(trylast=True)
def lmserve_sampling_defaults(source: ModelSource, directory: Path | None) -> SamplingDefaults | None:
    if directory is not None:
        return from_generation_config(directory / GENERATION_CONFIG_FILE, str(directory / GENERATION_CONFIG_FILE))
    if source.format == "gguf":
        return from_gguf_metadata(source.path)
    path = Path(source.path) / GENERATION_CONFIG_FILE
    if not path.is_file():
        return None
    return from_generation_config(path, f"the model's {GENERATION_CONFIG_FILE}")


def from_generation_config(path: Path, origin: str) -> SamplingDefaults:
    """The defaults in an HF ``generation_config.json``; a file that is not a JSON object
    gives none, with a warning."""
    try:
        content = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        logger.warning("%s cannot be read (%s): no sampling defaults from it.", origin, exc)
        content = {}
    if not isinstance(content, dict):
        logger.warning("%s is not a JSON object: no sampling defaults from it.", origin)
        content = {}
    if content.get("do_sample") is False:
        logger.warning("%s says do_sample false (greedy, under HF transformers). As vLLM and LMDeploy do, "
                       "lmserve samples with its temperature, top_p and top_k; a request that wants greedy "
                       "decoding sends temperature 0.", origin)
    return SamplingDefaults.from_file({ours: content.get(theirs) for theirs, ours in HF_NAMES.items()}, origin)


def from_gguf_metadata(path: Path) -> SamplingDefaults | None:
    """The defaults in a GGUF file's ``general.sampling.*`` keys, or None when it has none."""
    from lmserve.backends.torch.gguf_file import gguf_reader  # the header is parsed once per process

    fields = gguf_reader(path).fields
    values = {ours: _plain(fields[key].contents()) for key, ours in GGUF_KEYS.items() if key in fields}
    if not values:
        return None
    return SamplingDefaults.from_file(values, "the GGUF file's general.sampling metadata")


def _plain(value: Any) -> Any:
    """A float32 read back as the decimal it was written from (0.6, not 0.6000000238)."""
    if isinstance(value, float):
        return float(f"{value:.7g}")
    return value
