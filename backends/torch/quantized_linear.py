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

The kernels serve up to :data:`DENSE_ABOVE_ROWS` rows a call (decode steps of a
few streams); beyond that a layer multiplies with a dense copy of the weight its
codes stand for, in the model's dtype: faster there, at the cost of the memory
quantization would save. The two round differently, so a row's logits would depend
on how many rows share its step; ``--batch-invariant`` makes every layer take one of
them for any row count (:func:`use_one_matmul`).

CPU only: on CUDA ``--quantization int8|int4`` is refused at start-up (``auto``
chooses none there; :mod:`~lmserve.backends.torch.quantization_choice`).
"""

from __future__ import annotations

import sys

import torch
from torch import nn

from lmserve.backends.torch.engine_config import check_quantization
from lmserve.backends.torch.ops import define_op
from lmserve.backends.torch.packed_linear import pack_weight, packed_linear, packing_supported

#: Inputs sharing one int4 scale and zero (GGUF's Q4_x block size).
INT4_GROUP_SIZE = 32

#: The activations' dtype inside a quantized layer (the kernels' fast path).
COMPUTE_DTYPE = torch.bfloat16

#: Inputs of more rows than this (prefill chunks, large decode batches) are multiplied
#: with a dense copy of the weight instead: the weight-only kernels unpack their tiles
#: for every few rows, and measured on a 2-core AVX512 CPU with SmolLM2-135M's shapes
#: they tie with packed bfloat16 at 8 rows and take 1.8x its time at 32 and 2.1x at 64.
DENSE_ABOVE_ROWS = 8


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


def _int8_matmul(rows: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    return torch.ops.aten._weight_int8pack_mm(rows, weight, scales)


def _int4_matmul(rows: torch.Tensor, weight: torch.Tensor, scales_and_zeros: torch.Tensor,
                 group_size: int) -> torch.Tensor:
    return torch.ops.aten._weight_int4pack_mm_for_cpu(rows, weight, group_size, scales_and_zeros)


def _weight_only_linear(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor, group_size: int,
                        dense_weight: torch.Tensor, dense_packed: bool, out_features: int,
                        dense_above_rows: int) -> torch.Tensor:
    """``[N, in]`` -> ``[N, out]`` without the bias: the weight-only kernel for up
    to ``dense_above_rows`` rows, the dense copy of the same weight beyond.
    ``group_size`` 0 means int8 (``scales`` per row), else int4 groups."""
    if x.shape[0] > dense_above_rows:
        if dense_packed:
            return packed_linear(x, dense_weight, None)
        return nn.functional.linear(x, dense_weight)
    rows = x.to(COMPUTE_DTYPE)
    out = _int8_matmul(rows, weight, scales) if group_size == 0 else _int4_matmul(rows, weight, scales, group_size)
    return out.to(x.dtype)


def _weight_only_linear_shape(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor, group_size: int,
                              dense_weight: torch.Tensor, dense_packed: bool, out_features: int,
                              dense_above_rows: int) -> torch.Tensor:
    return x.new_empty(x.shape[0], out_features)


# One operator for both kinds: which matmul runs depends on the rows, which the
# compiled step does not know in advance (a branch in Python would compile one graph per side).
define_op("weight_only_linear(Tensor x, Tensor weight, Tensor scales, int group_size, Tensor dense_weight, "
          "bool dense_packed, int out_features, int dense_above_rows) -> Tensor", _weight_only_linear, _weight_only_linear_shape)


class WeightOnlyLinear(nn.Module):
    """What both quantized layers share: the shape, the float bias, the dense copy
    for many rows, and the forward through ``lmserve::weight_only_linear``.

    A subclass stores its codes and ``scales``, then calls :meth:`keep_dense_copy`
    with the weight its codes stand for."""

    #: Inputs per int4 scale and zero; 0 for int8 (one scale per row).
    group_size = 0
    #: Inputs of more rows than this take the dense copy (:func:`use_one_matmul` sets it per layer).
    dense_above_rows = DENSE_ABOVE_ROWS

    def __init__(self, linear: nn.Linear, dtype: torch.dtype | None):
        """``dtype``: the model's (the bias and the dense copy are kept in it; default: the layer's)."""
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.dtype = dtype or linear.weight.dtype
        bias = None if linear.bias is None else linear.bias.detach().to(self.dtype)
        self.register_buffer("bias", bias, persistent=False)

    def keep_dense_copy(self, weight: torch.Tensor) -> None:
        """Keep ``weight`` (what the codes stand for) in the model's dtype for inputs of
        more than :data:`DENSE_ABOVE_ROWS` rows, packed for oneDNN where that works."""
        weight = weight.to(self.dtype)
        self.dense_packed = weight.device.type == "cpu" and packing_supported(self.dtype)
        self.register_buffer("dense_weight", pack_weight(weight) if self.dense_packed else weight, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # A [T, in] input (the model's case) needs no reshape.
        rows = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])
        out = torch.ops.lmserve.weight_only_linear(rows, self.codes, self.scales, self.group_size,
                                                   self.dense_weight, self.dense_packed, self.out_features,
                                                   self.dense_above_rows)
        if self.bias is not None:
            out = out + self.bias
        return out if x.dim() == 2 else out.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class Int8Linear(WeightOnlyLinear):
    """``nn.Linear`` with int8 weights (one scale per output row); CPU, inference only."""

    def __init__(self, linear: nn.Linear, dtype: torch.dtype | None = None):
        super().__init__(linear, dtype)
        codes, scales = quantize_int8(linear.weight.detach())
        self.register_buffer("codes", codes, persistent=False)
        self.register_buffer("scales", scales.to(COMPUTE_DTYPE), persistent=False)
        self.keep_dense_copy(codes.float() * self.scales.float()[:, None])


class Int4Linear(WeightOnlyLinear):
    """``nn.Linear`` with 4-bit weights in groups of :data:`INT4_GROUP_SIZE`; CPU, inference only.

    ``codes`` are packed for the kernel; ``scales`` hold (scale, zero) pairs."""

    def __init__(self, linear: nn.Linear, dtype: torch.dtype | None = None, group_size: int = INT4_GROUP_SIZE):
        super().__init__(linear, dtype)
        self.group_size = group_size
        codes, scales, zeros = quantize_int4(linear.weight.detach(), group_size)
        scales, zeros = scales.to(COMPUTE_DTYPE), zeros.to(COMPUTE_DTYPE)
        self.register_buffer("codes", torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1),
                             persistent=False)
        # The kernel's layout: [K / group, N, (scale, zero)].
        scales_and_zeros = torch.stack([scales, zeros], dim=-1).transpose(0, 1).contiguous()
        self.register_buffer("scales", scales_and_zeros, persistent=False)
        self.keep_dense_copy(dequantize_int4(codes, scales.float(), zeros.float(), group_size))

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, group_size={self.group_size}"


def use_one_matmul(model: nn.Module, dense: bool) -> int:
    """Make every quantized layer of ``model`` multiply inputs of any row count the same
    way (``--batch-invariant``): with the dense copy if ``dense``, else with the weight-only
    kernel. Either gives a row the same bits whatever the other rows (the kernels and the
    packed oneDNN matmul compute each row alone); switching between them at
    :data:`DENSE_ABOVE_ROWS` does not. Returns how many layers were set."""
    layers = [module for module in model.modules() if isinstance(module, WeightOnlyLinear)]
    for layer in layers:
        layer.dense_above_rows = -1 if dense else sys.maxsize
    return len(layers)


def int4_fits(linear: nn.Linear) -> bool:
    """Whether the int4 kernel takes ``linear``'s shape (whole groups in, outputs in sixteens)."""
    return linear.in_features % INT4_GROUP_SIZE == 0 and linear.out_features % 16 == 0


def quantize_linear_layers(model: nn.Module, method: str, dtype: torch.dtype | None = None) -> int:
    """Replace the model's CPU ``nn.Linear`` layers by quantized ones (``method``:
    ``int8`` or ``int4``; ``lm_head`` always int8); returns how many were replaced.
    ``dtype``: the model's, for the layers' dense copies (default: each layer's).

    Layers whose shape the int4 kernel cannot take become int8."""
    check_quantization(method)
    replaced = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is not nn.Linear or child.weight.device.type != "cpu":
                continue
            if method == "int4" and name != "lm_head" and int4_fits(child):
                setattr(parent, name, Int4Linear(child, dtype))
            else:
                setattr(parent, name, Int8Linear(child, dtype))
            replaced += 1
    return replaced
