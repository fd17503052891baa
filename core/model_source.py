"""A resolved model: what MODEL turned out to be on disk."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal


@dataclass(frozen=True)
class ModelSource:
    """Where a model's files are.

    ``path`` is a ``.gguf`` file (``format="gguf"``) or an HF-style directory
    with ``config.json``, ``*.safetensors`` and tokenizer files
    (``format="hf"``). ``name`` is what the user asked for; it is the default
    model name served in ``/v1/models``.
    """

    name: str
    path: Path
    format: Literal["gguf", "hf"]
    found_by: str  # a short phrase for logs: "local path", "hub cache", ...

    def __post_init__(self) -> None:
        if self.format not in ("gguf", "hf"):
            raise ValueError(f"ModelSource.format must be 'gguf' or 'hf', got {self.format!r}")


class ModelNotFoundError(LookupError):
    """No plugin could resolve MODEL; the message lists what was tried."""

    def __init__(self, model: str, tried: list[str]):
        what = "; ".join(tried) or "no model resolver is loaded"
        super().__init__(f"Cannot find model {model!r} (nothing is downloaded). Tried: {what}.")
        self.model = model
        self.tried = tried
