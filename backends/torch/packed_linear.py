"""Linear layers whose weights are pre-packed for oneDNN: the CPU's fast matmul path.

``F.linear`` on the CPU lays each weight out for the matmul kernel on every
call. Packing it once, after loading, into oneDNN's blocked layout skips that
work: measured on a 2-core x86-64 CPU with SmolLM2-135M's shapes, 1.2-1.6x in
bfloat16 and 2-3.6x in float32 (same results in bfloat16; float32 sums in a
different order, within rounding). The engine packs every projection of the
model when it runs on the CPU (:func:`pack_linear_layers`); the packed layers
compute the same function as the ``nn.Linear`` they replace.

oneDNN's packing ops are internal to torch (its compiler uses them for frozen
CPU graphs), so :func:`packing_supported` probes them once per dtype and
everything falls back to plain ``nn.Linear`` where they are missing or fail.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from lmserve.backends.torch.ops import define_op
from lmserve.backends.torch.primitive_caches import bucket

#: Rows per call the packed layout is tuned for (a decode batch); any row count works.
BATCH_SIZE_HINT = 64


@functools.cache
def packing_supported(dtype: torch.dtype) -> bool:
    """Whether this torch build can pack and run CPU linear layers of ``dtype``
    (and gets the same numbers as ``F.linear`` on a probe)."""
    ops = torch.ops.mkldnn
    if not (torch.backends.mkldnn.is_available() and hasattr(ops, "_reorder_linear_weight")
            and hasattr(ops, "_linear_pointwise")):
        return False
    try:
        generator = torch.Generator().manual_seed(0)
        weight = torch.randn(24, 16, generator=generator).to(dtype)
        bias = torch.randn(24, generator=generator).to(dtype)
        x = torch.randn(3, 16, generator=generator).to(dtype)
        packed = packed_linear(x, pack_weight(weight, 3), bias)
        tolerance = 1e-4 if dtype == torch.float32 else 2e-2
        return bool(torch.allclose(packed.float(), nn.functional.linear(x, weight, bias).float(),
                                   rtol=tolerance, atol=tolerance))
    except RuntimeError:
        return False


def pack_weight(weight: torch.Tensor, batch_size_hint: int = BATCH_SIZE_HINT) -> torch.Tensor:
    """``[out, in]`` -> the same weight in oneDNN's blocked layout (check :func:`packing_supported`)."""
    return torch.ops.mkldnn._reorder_linear_weight(weight, batch_size_hint)


def packed_linear(x: torch.Tensor, packed_weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``F.linear`` with a weight from :func:`pack_weight`, its rows padded to a
    :func:`~lmserve.backends.torch.primitive_caches.bucket`."""
    rows = x.reshape(-1, x.shape[-1])
    padding = bucket(rows.shape[0]) - rows.shape[0]
    if not padding:
        return torch.ops.mkldnn._linear_pointwise(x, packed_weight, bias, "none", [], "")
    padded = torch.cat([rows, rows.new_zeros(padding, rows.shape[1])])
    out = torch.ops.mkldnn._linear_pointwise(padded, packed_weight, bias, "none", [], "")[: rows.shape[0]]
    return out.reshape(*x.shape[:-1], out.shape[-1])


def _packed_linear(x: torch.Tensor, packed_weight: torch.Tensor, bias: torch.Tensor | None,
                   out_features: int) -> torch.Tensor:
    return packed_linear(x, packed_weight, bias)


def _packed_linear_shape(x: torch.Tensor, packed_weight: torch.Tensor, bias: torch.Tensor | None,
                         out_features: int) -> torch.Tensor:
    return x.new_empty(*x.shape[:-1], out_features)


# An operator of its own: the compiler may only pass oneDNN packed weights that are constants.
define_op("packed_linear(Tensor x, Tensor packed_weight, Tensor? bias, int out_features) -> Tensor",
          _packed_linear, _packed_linear_shape)


class PackedLinear(nn.Module):
    """``nn.Linear`` with its weight packed for oneDNN (CPU only, inference only)."""

    def __init__(self, linear: nn.Linear, batch_size_hint: int = BATCH_SIZE_HINT):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        weight = linear.weight.detach()
        self.register_buffer("packed_weight", pack_weight(weight, batch_size_hint), persistent=False)
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.lmserve.packed_linear(x, self.packed_weight, self.bias, self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def pack_linear_layers(model: nn.Module) -> int:
    """Replace every CPU ``nn.Linear`` in ``model`` whose dtype packs by a
    :class:`PackedLinear`; returns how many were replaced. A weight shared with
    another module (tied embeddings) stays where it is; the packed layer holds a copy."""
    replaced = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if (type(child) is nn.Linear and child.weight.device.type == "cpu"
                    and packing_supported(child.weight.dtype)):
                setattr(parent, name, PackedLinear(child))
                replaced += 1
    return replaced
