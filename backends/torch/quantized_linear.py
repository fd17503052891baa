"""Weight-only quantized linear layers: fewer bytes read per token (``--quantization``).

A decode step on the CPU reads every weight once per step, so its speed is the
memory bandwidth divided by the bytes of the weights. These layers keep the
weights in 8 or 4 bits and multiply with torch's CPU weight-only kernels,
which unpack a tile at a time in registers:

- :class:`Int8Linear` (``int8``): symmetric, one float scale per output row
  (``w = q * scale``, ``q`` in [-127, 127]); ``aten._weight_int8pack_mm``.
- :class:`Int4Linear` (``int4``): asymmetric, groups of :data:`INT4_GROUP_SIZE`
  inputs per output row, ``w = (q - 8) * scale + zero`` with ``q`` in [0, 15]:
  the layout of GGUF's Q4_1 blocks (``w = d * q + m``, 32 weights a block,
  ``zero = m + 8 d``), so a Q4_1 file's projections loaded in float32 get back
  their own 4-bit codes (scales and zeros are kept in bfloat16);
  ``aten._weight_int4pack_mm_for_cpu``.

The kernels run fastest with bfloat16 activations (their float32 path is not
vectorised, nor is float16's: 5-30x slower on the same shapes), so a layer converts its input to
bfloat16 and its output back; the model's other work stays in its dtype.
In ``int4`` mode the output projection (``lm_head``, which decides the token) is
kept in int8, as llama.cpp keeps it at 6 or 8 bits.

CPU only: on CUDA ``--quantization`` is refused at start-up.
"""

from __future__ import annotations

import torch
from torch import nn

from lmserve.core.config import QUANTIZATIONS

#: Inputs sharing one int4 scale and zero (GGUF's Q4_x block size).
INT4_GROUP_SIZE = 32

#: The activations' dtype inside a quantized layer (the kernels' fast path).
COMPUTE_DTYPE = torch.bfloat16


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``[N, K]`` float -> (``[N, K]`` int8, ``[N]`` float32 scales), symmetric per row."""
    weight = weight.float()
    absmax = weight.abs().amax(dim=1)
    scales = torch.where(absmax > 0, absmax / 127, torch.ones_like(absmax))
    quantized = torch.round(weight / scales[:, None]).clamp_(-127, 127).to(torch.int8)
    return quantized, scales


def quantize_int4(weight: torch.Tensor, group_size: int = INT4_GROUP_SIZE
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``[N, K]`` float -> (``[N, K]`` int32 codes in [0, 15], ``[N, K / group]`` scales,
    ``[N, K / group]`` zeros), so that ``w ~ (q - 8) * scale + zero`` per group.

    Each group spans its minimum to its maximum in 15 steps (as GGUF's Q4_1 does),
    so the weights of a dequantized Q4_1 tensor quantize back to the same codes."""
    rows, columns = weight.shape
    groups = weight.float().reshape(rows, columns // group_size, group_size)
    low, high = groups.amin(dim=-1), groups.amax(dim=-1)
    scales = (high - low) / 15
    steps = torch.where(scales > 0, scales, torch.ones_like(scales))
    codes = torch.round((groups - low[..., None]) / steps[..., None]).clamp_(0, 15).to(torch.int32)
    return codes.reshape(rows, columns), scales, low + 8 * scales


def dequantize_int4(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                    group_size: int = INT4_GROUP_SIZE) -> torch.Tensor:
    """The float32 ``[N, K]`` weight that :func:`quantize_int4`'s output stands for."""
    rows, columns = codes.shape
    groups = codes.reshape(rows, columns // group_size, group_size).float()
    return ((groups - 8) * scales[..., None] + zeros[..., None]).reshape(rows, columns)


class WeightOnlyLinear(nn.Module):
    """What both quantized layers share: the shape, the float bias, and running the
    kernel (:meth:`matmul`) on the input's rows in :data:`COMPUTE_DTYPE`."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach(), persistent=False)

    def matmul(self, rows: torch.Tensor) -> torch.Tensor:
        """``[N, in]`` in :data:`COMPUTE_DTYPE` -> ``[N, out]``, without the bias."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # A [T, in] input (the model's case) needs no reshape.
        rows = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])
        out = self.matmul(rows.to(COMPUTE_DTYPE)).to(x.dtype)
        if self.bias is not None:
            out = out + self.bias
        return out if x.dim() == 2 else out.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class Int8Linear(WeightOnlyLinear):
    """``nn.Linear`` with int8 weights (one scale per output row); CPU, inference only."""

    def __init__(self, linear: nn.Linear):
        super().__init__(linear)
        quantized, scales = quantize_int8(linear.weight.detach())
        self.register_buffer("weight_int8", quantized, persistent=False)
        self.register_buffer("scales", scales.to(COMPUTE_DTYPE), persistent=False)

    def matmul(self, rows: torch.Tensor) -> torch.Tensor:
        return torch.ops.aten._weight_int8pack_mm(rows, self.weight_int8, self.scales)


class Int4Linear(WeightOnlyLinear):
    """``nn.Linear`` with 4-bit weights in groups of :data:`INT4_GROUP_SIZE`; CPU, inference only."""

    def __init__(self, linear: nn.Linear, group_size: int = INT4_GROUP_SIZE):
        super().__init__(linear)
        self.group_size = group_size
        codes, scales, zeros = quantize_int4(linear.weight.detach(), group_size)
        self.register_buffer("weight_int4", torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1),
                             persistent=False)
        # The kernel's layout: [K / group, N, (scale, zero)].
        scales_and_zeros = torch.stack([scales, zeros], dim=-1).transpose(0, 1).contiguous()
        self.register_buffer("scales_and_zeros", scales_and_zeros.to(COMPUTE_DTYPE), persistent=False)

    def matmul(self, rows: torch.Tensor) -> torch.Tensor:
        return torch.ops.aten._weight_int4pack_mm_for_cpu(rows, self.weight_int4, self.group_size,
                                                          self.scales_and_zeros)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, group_size={self.group_size}"


def int4_fits(linear: nn.Linear) -> bool:
    """Whether the int4 kernel takes ``linear``'s shape (whole groups in, outputs in sixteens)."""
    return linear.in_features % INT4_GROUP_SIZE == 0 and linear.out_features % 16 == 0


def check_quantization(method: str) -> None:
    if method not in QUANTIZATIONS:
        raise ValueError(f"--quantization must be one of {', '.join(QUANTIZATIONS)}, got {method!r}.")


def quantize_linear_layers(model: nn.Module, method: str) -> int:
    """Replace the model's CPU ``nn.Linear`` layers by quantized ones (``method``:
    ``int8`` or ``int4``; ``lm_head`` always int8); returns how many were replaced.

    Layers whose shape the int4 kernel cannot take become int8."""
    check_quantization(method)
    replaced = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is not nn.Linear or child.weight.device.type != "cpu":
                continue
            if method == "int4" and name != "lm_head" and int4_fits(child):
                setattr(parent, name, Int4Linear(child))
            else:
                setattr(parent, name, Int8Linear(child))
            replaced += 1
    return replaced
