"""Load a model from a GGUF file or an HF safetensors directory.

The model is built on the meta device, given uninitialised storage of the
target dtype on the target device, and filled one tensor at a time, so at
most one source tensor is held beside the model. The checkpoint's architecture
picks its family (:mod:`~lmserve.backends.torch.models.family`), which reads the
config, builds the model and maps each tensor's name (and layout) to the model's;
GGUF tensors are dequantized first.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lmserve.backends.torch.gguf_file import gguf_reader
from lmserve.backends.torch.model_config import ModelConfig
from lmserve.backends.torch.models.causal_lm import CausalLM
from lmserve.backends.torch.models.family import (
    ModelFamily,
    family_for_architecture,
    read_gguf_config,
    read_hf_config,
)
from lmserve.backends.torch.tensor_parallel import SINGLE, TensorParallel

ProgressCallback = Callable[[int, int], None]

def load_model(path: str | Path, *, device: torch.device | str = "cpu",
               dtype: torch.dtype = torch.float32, progress: ProgressCallback | None = None,
               parallel: TensorParallel = SINGLE,
               families: Iterable[ModelFamily] | None = None) -> tuple[ModelConfig, CausalLM]:
    """Read the config and weights at ``path`` (a ``.gguf`` file or a directory
    with ``config.json`` and ``*.safetensors``) into a model in eval mode.

    ``progress(done, total)`` is called after each source tensor is loaded.
    Under tensor parallelism (``parallel``) the model keeps only this rank's part
    of each tensor, cut as each one is read. ``families``: those the checkpoint's
    architecture is looked up in (default: the built-in ones).
    Raises ValueError naming any tensor the model lacks or the file lacks.
    """
    path = Path(path)
    if path.is_file() and path.suffix == ".gguf":
        return _load_gguf(path, device, dtype, progress, parallel, families)
    if path.is_dir() and (path / "config.json").is_file():
        return _load_hf_directory(path, device, dtype, progress, parallel, families)
    raise FileNotFoundError(f"{path} is neither a .gguf file nor a directory with config.json")


def read_model_config(path: str | Path, families: Iterable[ModelFamily] | None = None) -> ModelConfig:
    """The config of the model at ``path``, without its weights."""
    path = Path(path)
    if path.is_file() and path.suffix == ".gguf":
        reader = gguf_reader(path)
        shapes = {t.name: tuple(int(n) for n in reversed(t.shape)) for t in reader.tensors}
        return read_gguf_config(read_gguf_fields(reader), shapes, families)
    if path.is_dir() and (path / "config.json").is_file():
        return _read_hf_config(path, families)
    raise FileNotFoundError(f"{path} is neither a .gguf file nor a directory with config.json")


def create_empty_model(config: ModelConfig, device: torch.device | str, dtype: torch.dtype,
                       parallel: TensorParallel = SINGLE, families: Iterable[ModelFamily] | None = None) -> CausalLM:
    """The model (this rank's part of it) with uninitialised weights of ``dtype`` on ``device``."""
    family = family_for_architecture(config.architecture, families)
    with torch.device("meta"):
        model = family.build_model(config, parallel)
    model.to(dtype=dtype).to_empty(device=device)
    model.tie_weights()
    model.reset_buffers()
    return model.eval()


class _ParameterFiller:
    """Copies named tensors into a model's parameters and checks that every
    parameter was filled exactly once and no tensor was left over."""

    def __init__(self, model: CausalLM, progress: ProgressCallback | None, total: int):
        self.parameters = dict(model.named_parameters())
        self.slices = model.weight_slices()
        self.loaded: set[str] = set()
        self.unexpected: list[str] = []
        self.progress, self.total, self.done = progress, total, 0

    @torch.no_grad()
    def fill(self, name: str, tensor: torch.Tensor, source_name: str) -> None:
        parameter = self.parameters.get(name)
        if parameter is None or name in self.loaded:
            self.unexpected.append(source_name if name == source_name else f"{source_name} (as {name})")
            return
        if name in self.slices:
            tensor = self.slices[name].take(tensor)
        if tuple(tensor.shape) != tuple(parameter.shape):
            raise ValueError(f"tensor {source_name} has shape {tuple(tensor.shape)}, "
                             f"the model expects {tuple(parameter.shape)} for {name}")
        parameter.copy_(tensor)
        self.loaded.add(name)

    def step(self) -> None:
        self.done += 1
        if self.progress is not None:
            self.progress(self.done, self.total)

    def finish(self, source: Path) -> None:
        missing = sorted(set(self.parameters) - self.loaded)
        problems = []
        if missing:
            problems.append(f"missing tensors: {_name_list(missing)}")
        if self.unexpected:
            problems.append(f"unexpected tensors: {_name_list(self.unexpected)}")
        if problems:
            raise ValueError(f"{source} does not match the model: {'; '.join(problems)}")


def _name_list(names: list[str], limit: int = 10) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


# --- HF safetensors directories ------------------------------------------------------------


def _read_hf_config(directory: Path, families: Iterable[ModelFamily] | None = None) -> ModelConfig:
    hf_config = json.loads((directory / "config.json").read_text())
    generation_path = directory / "generation_config.json"
    generation = json.loads(generation_path.read_text()) if generation_path.is_file() else None
    return read_hf_config(hf_config, generation, families)


def _load_hf_directory(directory: Path, device, dtype, progress, parallel: TensorParallel,
                       families: Iterable[ModelFamily] | None) -> tuple[ModelConfig, CausalLM]:
    from safetensors import safe_open

    config = _read_hf_config(directory, families)
    family = family_for_architecture(config.architecture, families)
    files = _safetensors_files(directory)
    handles = [safe_open(str(f), framework="pt", device="cpu") for f in files]
    names = [(handle, name) for handle in handles for name in handle.keys()]
    model = create_empty_model(config, device, dtype, parallel, families)
    filler = _ParameterFiller(model, progress, len(names))
    for handle, name in names:
        for target, tensor in family.hf_tensors(config, name, handle.get_tensor(name)):
            filler.fill(target, tensor, name)
        filler.step()
    filler.finish(directory)
    return config, model


def _safetensors_files(directory: Path) -> list[Path]:
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return [directory / name for name in sorted(set(weight_map.values()))]
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{directory} has no *.safetensors files")
    return files


# --- GGUF files --------------------------------------------------------------------------


def read_gguf_fields(reader: Any) -> dict[str, Any]:
    """A ``gguf.GGUFReader``'s metadata as plain Python values (strings,
    numbers, lists), keyed by GGUF key."""
    return {key: field.contents() for key, field in reader.fields.items()}


def gguf_tensor_types(path: str | Path) -> dict[str, str]:
    """Each tensor's GGUF type (``"Q4_1"``, ``"F32"``...) by its GGUF name; empty for
    anything but a ``.gguf`` file."""
    path = Path(path)
    if not (path.is_file() and path.suffix == ".gguf"):
        return {}
    return {t.name: t.tensor_type.name for t in gguf_reader(path).tensors}


def _load_gguf(path: Path, device, dtype, progress, parallel: TensorParallel,
               families: Iterable[ModelFamily] | None) -> tuple[ModelConfig, CausalLM]:
    reader = gguf_reader(path)
    fields = read_gguf_fields(reader)
    shapes = {t.name: tuple(int(n) for n in reversed(t.shape)) for t in reader.tensors}
    config = read_gguf_config(fields, shapes, families)
    family = family_for_architecture(config.architecture, families)
    model = create_empty_model(config, device, dtype, parallel, families)
    filler = _ParameterFiller(model, progress, len(reader.tensors))
    for gguf_tensor in reader.tensors:
        name = gguf_tensor.name
        tensor = _dequantize(gguf_tensor, shapes[name])
        if name == "rope_freqs.weight":  # Llama 3 rope scaling, as per-frequency divisors
            model.model.rotary_emb.reset_parameters(freq_factors=tensor)
        elif not family.load_gguf_buffer(model, name, tensor):
            for target, part in family.gguf_tensors(config, name, tensor):
                filler.fill(target, part, name)
        filler.step()
    filler.finish(path)
    return config, model


def _dequantize(gguf_tensor: Any, shape: tuple[int, ...]) -> torch.Tensor:
    """A GGUF tensor as a CPU torch tensor of ``shape`` (row-major order:
    GGUF lists dimensions innermost first). F32/F16 stay as they are; other
    types are dequantized to float32."""
    from gguf import GGMLQuantizationType, quants

    data = gguf_tensor.data
    if gguf_tensor.tensor_type in (GGMLQuantizationType.F32, GGMLQuantizationType.F16):
        array = np.array(data)  # a writable copy of one tensor; the file stays memory-mapped
    else:
        array = quants.dequantize(data, gguf_tensor.tensor_type)
    return torch.from_numpy(array).reshape(shape)
