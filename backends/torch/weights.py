"""Load a llama-family model from a GGUF file or an HF safetensors directory.

The model is built on the meta device, given uninitialised storage of the
target dtype on the target device, and filled one tensor at a time, so at
most one source tensor is held beside the model. Each format maps its names
to the model's (HF ``LlamaForCausalLM``) names:

- HF Llama / Mistral / Qwen2: already the model's names.
- HF InternLM2: ``attention.wqkv`` is split into q/k/v; other names renamed.
- GGUF: llama.cpp names (``blk.N.attn_q`` ...); quantized tensors are
  dequantized; for the ``llama`` and ``internlm2`` architectures the q/k rows
  are un-permuted (llama.cpp interleaves each head's rotary halves).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lmserve.backends.torch.model import LlamaForCausalLM
from lmserve.backends.torch.model_config import ModelConfig
from lmserve.backends.torch.tensor_parallel import SINGLE, TensorParallel

ProgressCallback = Callable[[int, int], None]

# GGUF architectures whose q/k weights llama.cpp's converter permuted.
_PERMUTED_GGUF_ARCHITECTURES = ("llama", "internlm2")
_GGUF_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_GGUF_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_INTERNLM2_LAYER_NAMES = {
    "attention.wo": "self_attn.o_proj", "feed_forward.w1": "mlp.gate_proj",
    "feed_forward.w3": "mlp.up_proj", "feed_forward.w2": "mlp.down_proj",
    "attention_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
}
_LAYER_NAME = re.compile(r"^(?:model\.layers|blk)\.(\d+)\.(.+)\.(weight|bias)$")


def load_model(path: str | Path, *, device: torch.device | str = "cpu",
               dtype: torch.dtype = torch.float32, progress: ProgressCallback | None = None,
               parallel: TensorParallel = SINGLE) -> tuple[ModelConfig, LlamaForCausalLM]:
    """Read the config and weights at ``path`` (a ``.gguf`` file or a directory
    with ``config.json`` and ``*.safetensors``) into a model in eval mode.

    ``progress(done, total)`` is called after each source tensor is loaded.
    Under tensor parallelism (``parallel``) the model keeps only this rank's part
    of each tensor, cut as each one is read.
    Raises ValueError naming any tensor the model lacks or the file lacks.
    """
    path = Path(path)
    if path.is_file() and path.suffix == ".gguf":
        return _load_gguf(path, device, dtype, progress, parallel)
    if path.is_dir() and (path / "config.json").is_file():
        return _load_hf_directory(path, device, dtype, progress, parallel)
    raise FileNotFoundError(f"{path} is neither a .gguf file nor a directory with config.json")


def read_model_config(path: str | Path) -> ModelConfig:
    """The config of the model at ``path``, without its weights."""
    path = Path(path)
    if path.is_file() and path.suffix == ".gguf":
        from gguf import GGUFReader

        reader = GGUFReader(str(path))
        shapes = {t.name: tuple(int(n) for n in reversed(t.shape)) for t in reader.tensors}
        return ModelConfig.from_gguf_fields(read_gguf_fields(reader), shapes)
    if path.is_dir() and (path / "config.json").is_file():
        return _read_hf_config(path)
    raise FileNotFoundError(f"{path} is neither a .gguf file nor a directory with config.json")


def create_empty_model(config: ModelConfig, device: torch.device | str,
                       dtype: torch.dtype, parallel: TensorParallel = SINGLE) -> LlamaForCausalLM:
    """The model (this rank's part of it) with uninitialised weights of ``dtype`` on ``device``."""
    with torch.device("meta"):
        model = LlamaForCausalLM(config, parallel)
    model.to(dtype=dtype).to_empty(device=device)
    model.tie_weights()
    model.model.rotary_emb.reset_parameters()
    return model.eval()


class _ParameterFiller:
    """Copies named tensors into a model's parameters and checks that every
    parameter was filled exactly once and no tensor was left over."""

    def __init__(self, model: LlamaForCausalLM, progress: ProgressCallback | None, total: int):
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


def _read_hf_config(directory: Path) -> ModelConfig:
    hf_config = json.loads((directory / "config.json").read_text())
    generation_path = directory / "generation_config.json"
    generation = json.loads(generation_path.read_text()) if generation_path.is_file() else None
    return ModelConfig.from_hf_config(hf_config, generation)


def _load_hf_directory(directory: Path, device, dtype, progress,
                       parallel: TensorParallel) -> tuple[ModelConfig, LlamaForCausalLM]:
    from safetensors import safe_open

    config = _read_hf_config(directory)
    files = _safetensors_files(directory)
    handles = [safe_open(str(f), framework="pt", device="cpu") for f in files]
    names = [(handle, name) for handle in handles for name in handle.keys()]
    model = create_empty_model(config, device, dtype, parallel)
    filler = _ParameterFiller(model, progress, len(names))
    rename = _internlm2_tensors if config.architecture == "InternLM2ForCausalLM" else _hf_tensors
    for handle, name in names:
        for target, tensor in rename(config, name, handle.get_tensor(name)):
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


def _hf_tensors(config: ModelConfig, name: str, tensor: torch.Tensor) -> Iterator[tuple[str, torch.Tensor]]:
    if name.endswith("rotary_emb.inv_freq"):
        return  # computed, not loaded; some old checkpoints saved it
    if name == "lm_head.weight" and config.tie_word_embeddings:
        return  # tied to the embeddings; some checkpoints store a copy
    yield name, tensor


def _internlm2_tensors(config: ModelConfig, name: str,
                       tensor: torch.Tensor) -> Iterator[tuple[str, torch.Tensor]]:
    simple = {"model.tok_embeddings.weight": "model.embed_tokens.weight",
              "model.norm.weight": "model.norm.weight", "output.weight": "lm_head.weight"}
    if name in simple:
        yield from _hf_tensors(config, simple[name], tensor)
        return
    match = _LAYER_NAME.match(name)
    if match is None:
        yield name, tensor
        return
    layer, module, kind = match.groups()
    prefix = f"model.layers.{layer}."
    if module == "attention.wqkv":
        # Rows are grouped per kv head: [q_per_kv query heads, one key head, one value head].
        grouped = tensor.reshape(config.num_key_value_heads, config.num_queries_per_kv + 2,
                                 config.head_dim, *tensor.shape[1:])
        yield prefix + f"self_attn.q_proj.{kind}", grouped[:, :-2].reshape(-1, *tensor.shape[1:])
        yield prefix + f"self_attn.k_proj.{kind}", grouped[:, -2].reshape(-1, *tensor.shape[1:])
        yield prefix + f"self_attn.v_proj.{kind}", grouped[:, -1].reshape(-1, *tensor.shape[1:])
    elif module in _INTERNLM2_LAYER_NAMES:
        yield prefix + f"{_INTERNLM2_LAYER_NAMES[module]}.{kind}", tensor
    else:
        yield name, tensor


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
    from gguf import GGUFReader

    return {t.name: t.tensor_type.name for t in GGUFReader(str(path)).tensors}


def _load_gguf(path: Path, device, dtype, progress, parallel: TensorParallel) -> tuple[ModelConfig, LlamaForCausalLM]:
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    fields = read_gguf_fields(reader)
    shapes = {t.name: tuple(int(n) for n in reversed(t.shape)) for t in reader.tensors}
    config = ModelConfig.from_gguf_fields(fields, shapes)
    permuted = fields["general.architecture"] in _PERMUTED_GGUF_ARCHITECTURES
    model = create_empty_model(config, device, dtype, parallel)
    filler = _ParameterFiller(model, progress, len(reader.tensors))
    for gguf_tensor in reader.tensors:
        name = gguf_tensor.name
        tensor = _dequantize(gguf_tensor, shapes[name])
        if name == "rope_freqs.weight":  # Llama 3 rope scaling, as per-frequency divisors
            model.model.rotary_emb.reset_parameters(freq_factors=tensor)
        else:
            target = _gguf_to_model_name(name)
            if permuted and re.search(r"\.attn_[qk]\.", name):
                num_heads = config.num_attention_heads if ".attn_q." in name else config.num_key_value_heads
                tensor = _unpermute_qk(tensor, num_heads)
            filler.fill(target, tensor, name)
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


def _gguf_to_model_name(name: str) -> str:
    if name in _GGUF_GLOBAL_NAMES:
        return _GGUF_GLOBAL_NAMES[name]
    match = _LAYER_NAME.match(name)
    if match is None or match.group(2) not in _GGUF_LAYER_NAMES:
        return name
    layer, module, kind = match.groups()
    return f"model.layers.{layer}.{_GGUF_LAYER_NAMES[module]}.{kind}"


def _unpermute_qk(tensor: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Undo llama.cpp's q/k permutation. Its converter stores, per head, the
    rows ``reshape(n_head, 2, head_dim // 2, ...).swapaxes(1, 2)`` so that
    rotary pairs are adjacent; HF's rotate_half layout wants the halves apart."""
    rest = tensor.shape[1:]
    half = tensor.shape[0] // num_heads // 2
    return tensor.reshape(num_heads, half, 2, *rest).transpose(1, 2).reshape(tensor.shape)
