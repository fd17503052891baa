"""The sparse mixture-of-experts MLP and what its families (Qwen3-MoE, Mixtral) share: the
config's expert fields, the decoder layer, the experts' checkpoint layouts and the split.

A sparse layer's MLP is ``num_experts`` gated MLPs and a router. The router's logits (in
the model's dtype, as HF computes them) go through a float32 softmax; each token runs its
``top_k`` likeliest experts (renormalised to sum to one where the family says), and its
output is their outputs weighted by those probabilities.

The block runs each *active* expert once per step, on all of the step's tokens that chose
it: the ``[tokens x top_k]`` choices are sorted by expert (an argsort), each expert's
tokens are gathered, go through one matmul per projection, and are added back to their
rows weighted by their routing weights (``index_add_``). Only the count of tokens per
expert comes back to the host (one sync per layer); nothing loops over tokens, and the
same code runs on the CPU and CUDA. Every expert is a :class:`GatedMLP` of plain
``nn.Linear`` layers, so fusing gate/up, CPU packing and int8/int4 quantization apply
to the experts as to any dense MLP.

Which experts run depends on the tokens, so a decode step is not one fixed graph:
these models set :attr:`CausalLM.compiled_decodes` to False and run eagerly.

Under tensor parallelism each expert's inner dimension is split over the ranks like a
dense MLP's (column-parallel gate/up, row-parallel down); the router is whole on every
rank, so every rank picks the same experts, and one all-reduce adds the ranks' weighted
sums.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lmserve.backends.torch.model_config import GGUFFieldReader, ModelConfig
from lmserve.backends.torch.models.attention_layer import HeadNorm
from lmserve.backends.torch.models.decoder_layer import DecoderLayer
from lmserve.backends.torch.models.family import GGUF_LAYER_NAMES, LAYER_TENSOR, ModelFamily, Tensors
from lmserve.backends.torch.models.mlp import GatedMLP
from lmserve.backends.torch.tensor_parallel import SINGLE, TensorParallel, valid_sizes


@dataclass(frozen=True)
class MoEConfig(ModelConfig):
    """A :class:`ModelConfig` with experts: each sparse layer has ``num_experts`` gated MLPs
    of inner size ``moe_intermediate_size``, of which each token runs ``num_experts_per_tok``,
    their weights renormalised to sum to one when ``norm_topk_prob``. The layers in
    ``dense_layers`` have one dense MLP of ``intermediate_size`` instead (Qwen3-MoE's
    ``mlp_only_layers`` and ``decoder_sparse_step``)."""

    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = True
    dense_layers: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        super().__post_init__()
        object.__setattr__(self, "dense_layers", tuple(sorted({int(i) for i in self.dense_layers})))
        outside = [i for i in self.dense_layers if not 0 <= i < self.num_hidden_layers]
        if outside:
            raise ValueError(f"dense layers {outside} are not among the {self.num_hidden_layers} layers")
        if not self.has_experts:
            return
        if self.num_experts < 1:
            raise ValueError(f"a sparse layer needs experts, got num_experts={self.num_experts}")
        if not 1 <= self.num_experts_per_tok <= self.num_experts:
            raise ValueError(f"num_experts_per_tok must be between 1 and num_experts ({self.num_experts}), "
                             f"got {self.num_experts_per_tok}")
        if self.moe_intermediate_size < 1:
            raise ValueError(f"moe_intermediate_size must be positive, got {self.moe_intermediate_size}")

    @property
    def has_experts(self) -> bool:
        return len(self.dense_layers) < self.num_hidden_layers

    def is_sparse(self, layer_idx: int) -> bool:
        return layer_idx not in self.dense_layers


class Router(nn.Linear):
    """Each token's experts and their weights. A subclass of ``nn.Linear`` so that the
    engine's quantization and CPU packing, which replace plain ``nn.Linear`` layers, leave
    it as it is: a quantized router would pick other experts (llama.cpp's quantizer keeps
    it whole too). It is small: experts x hidden."""

    def __init__(self, hidden_size: int, num_experts: int, top_k: int, normalize: bool):
        super().__init__(hidden_size, num_experts, bias=False)
        self.top_k = top_k
        self.normalize = normalize

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``[T, hidden]`` -> each token's ``top_k`` experts ``[T, top_k]`` (int64, likeliest
        first) and their float32 weights ``[T, top_k]``."""
        probabilities = torch.softmax(self(x).float(), dim=-1)
        weights, experts = probabilities.topk(self.top_k, dim=-1)
        if self.normalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return experts, weights


class SparseMoE(nn.Module):
    """The experts and their router (this rank's part of every expert)."""

    def __init__(self, hidden_size: int, intermediate_size: int, num_experts: int, top_k: int,
                 normalize: bool, parallel: TensorParallel = SINGLE, activation: str = "silu"):
        """``normalize``: renormalise each token's top-k weights to sum to one."""
        super().__init__()
        self.parallel = parallel
        self.gate = Router(hidden_size, num_experts, top_k, normalize)
        self.experts = nn.ModuleList(GatedMLP(hidden_size, intermediate_size, parallel, activation, reduce=False)
                                     for _ in range(num_experts))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        experts, weights = self.gate.route(x)
        choices = experts.flatten()  # token t's j-th choice is at t * top_k + j
        order = choices.argsort(stable=True)  # the choices grouped by expert
        tokens = order // experts.shape[1]
        choice_weights = weights.flatten()[order, None]
        counts = torch.bincount(choices, minlength=len(self.experts)).tolist()
        out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
        end = 0
        for expert, count in zip(self.experts, counts):
            if not count:
                continue
            start, end = end, end + count
            rows = tokens[start:end]
            out.index_add_(0, rows, expert(x[rows]).float() * choice_weights[start:end])
        return self.parallel.all_reduce(out.to(x.dtype))


def moe_decoder_layer(config: MoEConfig, layer_idx: int, parallel: TensorParallel = SINGLE,
                      qk_norm: HeadNorm | None = None) -> DecoderLayer:
    """A pre-norm layer whose MLP is sparse (or dense where the config says);
    ``qk_norm``: per-head q/k norms (Qwen3-MoE)."""
    mlp = None
    if config.is_sparse(layer_idx):
        mlp = SparseMoE(config.hidden_size, config.moe_intermediate_size, config.num_experts,
                        config.num_experts_per_tok, config.norm_topk_prob, parallel)
    return DecoderLayer(config, layer_idx, parallel, qk_norm, mlp)


#: llama.cpp's stacked experts (``blk.N.<name>.weight``, ``[experts, out, in]``), as each expert's projection.
GGUF_STACKED_EXPERTS = {"ffn_gate_exps": "gate_proj", "ffn_up_exps": "up_proj", "ffn_down_exps": "down_proj"}
#: llama.cpp's sparse-layer names beyond the standard ones: the router.
GGUF_MOE_LAYER_NAMES = {**GGUF_LAYER_NAMES, "ffn_gate_inp": "mlp.gate"}


def moe_gguf_fields(fields: Mapping[str, Any], tensor_shapes: Mapping[str, tuple[int, ...]]) -> dict[str, Any]:
    """The :class:`MoEConfig` expert fields of a GGUF file: sparse layers are those with a
    router (``ffn_gate_inp``); llama.cpp always renormalises the top-k weights unless the
    file says otherwise. Refuses what this engine's router does not compute."""
    arch = fields.get("general.architecture")
    get = GGUFFieldReader(fields, arch)
    layers = get("block_count")
    sparse = [i for i in range(layers) if f"blk.{i}.ffn_gate_inp.weight" in tensor_shapes]
    if get("expert_shared_count", 0):
        raise ValueError(f"shared experts ({arch}.expert_shared_count) are not supported")
    if get("expert_gating_func", 1) != 1:
        raise ValueError(f"expert gating function {get('expert_gating_func')} is not supported, only softmax (1)")
    if get("expert_weights_scale", 1.0) not in (0.0, 1.0):
        raise ValueError(f"scaled expert weights ({arch}.expert_weights_scale) are not supported")
    moe_intermediate_size = get("expert_feed_forward_length", 0)
    if sparse and not moe_intermediate_size:
        moe_intermediate_size = tensor_shapes[f"blk.{sparse[0]}.ffn_gate_exps.weight"][1]
    return dict(num_experts=get("expert_count", 0), num_experts_per_tok=get("expert_used_count", 0),
                moe_intermediate_size=moe_intermediate_size, norm_topk_prob=bool(get("expert_weights_norm", True)),
                dense_layers=tuple(i for i in range(layers) if i not in sparse))


class MoEFamily(ModelFamily):
    """What the MoE families share: the experts' tensors as each expert's projections,
    from HF's fused 3-D layout (``mlp.experts.gate_up_proj`` ``[experts, 2 x inner,
    hidden]``, gate rows first, and ``mlp.experts.down_proj`` ``[experts, hidden, inner]``)
    as from per-expert tensors (``mlp.experts.E.gate_proj.weight``..., the model's own
    names), and from llama.cpp's stacked ``ffn_*_exps``; a split refused where the
    experts' inner size does not divide."""

    def hf_tensors(self, config: ModelConfig, name: str, tensor: torch.Tensor) -> Tensors:
        match = LAYER_TENSOR.match(name if name.endswith((".weight", ".bias")) else f"{name}.weight")
        if match is None or match.group(2) not in ("mlp.experts.gate_up_proj", "mlp.experts.down_proj"):
            yield from super().hf_tensors(config, name, tensor)
            return
        layer, module, _ = match.groups()
        prefix = f"model.layers.{layer}.mlp.experts"
        if module == "mlp.experts.down_proj":
            yield from unstack_experts(prefix, "down_proj", tensor)
        else:
            gate, up = tensor.chunk(2, dim=1)
            yield from unstack_experts(prefix, "gate_proj", gate)
            yield from unstack_experts(prefix, "up_proj", up)

    def gguf_tensors(self, config: ModelConfig, name: str, tensor: torch.Tensor) -> Tensors:
        match = LAYER_TENSOR.match(name)
        if match is None or match.group(2) not in GGUF_STACKED_EXPERTS:
            yield from super().gguf_tensors(config, name, tensor)
            return
        layer, module, _ = match.groups()
        yield from unstack_experts(f"model.layers.{layer}.mlp.experts", GGUF_STACKED_EXPERTS[module], tensor)

    def gguf_layer_names(self) -> Mapping[str, str]:
        return GGUF_MOE_LAYER_NAMES

    def check_parallel(self, config: MoEConfig, tensor_parallel_size: int) -> None:
        super().check_parallel(config, tensor_parallel_size)
        inner = config.moe_intermediate_size
        if config.has_experts and inner % tensor_parallel_size:
            sizes = [n for n in valid_sizes(config.num_attention_heads, config.num_key_value_heads) if inner % n == 0]
            raise ValueError(f"--tp {tensor_parallel_size} does not split this model's experts (inner size {inner}) "
                             f"evenly; valid sizes: {', '.join(map(str, sizes))}.")


def unstack_experts(prefix: str, projection: str, stacked: torch.Tensor) -> Tensors:
    """``[experts, out, in]`` as each expert's ``{prefix}.E.{projection}.weight``."""
    for expert, weight in enumerate(stacked.unbind(0)):
        yield f"{prefix}.{expert}.{projection}.weight", weight
