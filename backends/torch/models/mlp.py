"""The gated MLP of every dense family: ``down(act(gate(x)) * up(x))``.

SwiGLU (SiLU: Llama, Qwen, Mistral, Phi-3) or GeGLU (tanh-approximated GELU: Gemma).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lmserve.backends.torch.models.linear import column_parallel_linear, fuse_linear, row_parallel_linear
from lmserve.backends.torch.tensor_parallel import SINGLE, TensorParallel


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


#: HF's ``hidden_act`` / ``hidden_activation`` names this engine runs.
ACTIVATIONS = {"silu": F.silu, "swish": F.silu, "gelu_pytorch_tanh": gelu_tanh, "gelu_tanh": gelu_tanh}


class GatedMLP(nn.Module):
    """The MLP over this rank's part of the inner dimension (all of it on one device)."""

    def __init__(self, hidden_size: int, intermediate_size: int, parallel: TensorParallel = SINGLE,
                 activation: str = "silu", reduce: bool = True):
        """``reduce``: add up the ranks' outputs here (False: the caller does, e.g. a MoE block
        adding its experts first)."""
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation {activation!r} is not supported; supported: {', '.join(ACTIVATIONS)}")
        self.parallel = parallel
        self.act = ACTIVATIONS[activation]
        self.reduce = reduce
        inner = parallel.split(intermediate_size)
        self.gate_proj = column_parallel_linear(hidden_size, inner)
        self.up_proj = column_parallel_linear(hidden_size, inner)
        self.down_proj = row_parallel_linear(inner, hidden_size, bias=False, rank=parallel.rank)
        self.gate_up_proj: nn.Linear | None = None  # set by fuse_projections()

    def fuse_projections(self) -> None:
        """Replace gate/up_proj by one ``gate_up_proj``."""
        self.gate_up_proj = fuse_linear(self.gate_proj, self.up_proj)
        del self.gate_proj, self.up_proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate_up_proj is not None:
            gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        out = self.down_proj(self.act(gate) * up)
        return self.parallel.all_reduce(out) if self.reduce else out
