"""Attention over a paged KV cache, for a batch that mixes prefill chunks and decodes.

The model runner lays a step's tokens out as ``[decode tokens | prefill
chunk 1 | prefill chunk 2 | ...]`` and describes them in a
:class:`PagedAttentionMetadata`; the cache's ``attend`` calls
:func:`paged_attention` once per layer. Everything here is plain torch, so it
runs on the CPU and on CUDA alike.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from lmserve.backends.torch.kernels.attention import store_and_decode_attention
from lmserve.backends.torch.model_config import ModelConfig
from lmserve.backends.torch.ops import define_op
from lmserve.backends.torch.primitive_caches import bucket


class LayerAttention(NamedTuple):
    """How one layer attends, beyond its queries, keys and values; the caches hold one per
    layer (families differ here: Mistral's window, Gemma's scale, soft-cap and windows that
    alternate from layer to layer)."""

    #: Attend only to this many latest positions (0: all).
    window: int = 0
    #: Scores are ``query . key * scale``; None: ``head_dim ** -0.5``.
    scale: float | None = None
    #: > 0: scores pass through ``softcap * tanh(score / softcap)`` before the softmax
    #: (Gemma 2), which torch's fused attention cannot do: such layers attend with
    #: :func:`grouped_attention`.
    softcap: float = 0.0


#: A plain layer: causal, every position, ``head_dim ** -0.5``.
PLAIN = LayerAttention()


def layer_attention(config: ModelConfig) -> tuple[LayerAttention, ...]:
    """How each of ``config``'s layers attends."""
    return tuple(LayerAttention(config.layer_window(i), config.attention_scale,
                                config.attn_logit_softcapping or 0.0)
                 for i in range(config.num_hidden_layers))


def attention(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
              mask: torch.Tensor | None, layer: LayerAttention = PLAIN) -> torch.Tensor:
    """Grouped-query attention of ``[T, heads, head_dim]`` queries over
    ``[S, kv_heads, head_dim]`` keys/values; ``mask`` is ``[T, S]`` bool or
    None (``layer.window`` is already in it). Returns ``[T, heads * head_dim]``."""
    if layer.softcap:
        num_kv_heads = keys.shape[1]
        q = query.reshape(query.shape[0], num_kv_heads, -1, query.shape[2]).permute(1, 2, 0, 3)
        allowed = mask if mask is not None else torch.ones(query.shape[0], keys.shape[0], dtype=torch.bool,
                                                           device=query.device)
        o = grouped_attention(q, keys.transpose(0, 1).unsqueeze(1), values.transpose(0, 1).unsqueeze(1),
                              _bias(allowed), scale=layer.scale, softcap=layer.softcap)
        return o.permute(2, 0, 1, 3).reshape(query.shape[0], -1)
    out = batched_sdpa(query.transpose(0, 1), keys.transpose(0, 1), values.transpose(0, 1),
                       mask=mask, is_causal=False, scale=layer.scale)
    return out.transpose(0, 1).reshape(query.shape[0], -1)


def _bias(allowed: torch.Tensor) -> torch.Tensor:
    """A bool mask as the float32 bias :func:`grouped_attention` adds (0 or -inf)."""
    return torch.zeros(allowed.shape, dtype=torch.float32, device=allowed.device).masked_fill_(~allowed, float("-inf"))


def batched_sdpa(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                 mask: torch.Tensor | None, is_causal: bool, scale: float | None = None) -> torch.Tensor:
    """``scaled_dot_product_attention`` of one sequence's ``[heads, T, head_dim]``
    queries over ``[kv_heads, S, head_dim]`` keys/values, given a batch axis of one.

    With 3-D inputs torch's CPU takes its unfused math path (a 2,000-token prefill
    layer measured 430 ms); with the batch axis it takes the fused flash kernel
    (57 ms on the same shapes), so the axis is added here and nowhere else."""
    out = F.scaled_dot_product_attention(
        query.unsqueeze(0), keys.unsqueeze(0), values.unsqueeze(0), attn_mask=mask, is_causal=is_causal,
        enable_gqa=query.shape[0] != keys.shape[0], scale=scale)
    return out.squeeze(0)


def grouped_attention(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                      bias: torch.Tensor, bucketed: bool = False, scale: float | None = None,
                      softcap: float = 0.0) -> torch.Tensor:
    """Attention as two matmuls, for grouped-query shapes that broadcast:
    ``query [..., kv_heads, group, Q, head_dim]`` over ``keys``/``values``
    ``[..., kv_heads, 1, S, head_dim]`` (or, for decodes, the group as the query
    axis: ``query [n, kv_heads, group, head_dim]`` over ``[n, kv_heads, S, head_dim]``),
    with a float32 ``bias`` (0 where attending, -inf elsewhere) broadcast to the scores.

    Matmuls in the model's dtype, softmax in float32; no key/value repetition.
    For short queries this beats ``scaled_dot_product_attention`` on the CPU
    (decodes: 2.4x in bf16, 1.1x in fp32; 20 prefill chunks of 30-300 tokens:
    2x in bf16, 1.3x in fp32), but it holds every score in memory, so long
    chunks go to SDPA (:data:`MAX_GROUPED_SCORES`), as does everything on CUDA.

    ``bucketed``: pad the query and key lengths to a :func:`bucket` (prefill chunks,
    whose lengths vary, so the matmul shapes stay a bounded set: primitive_caches.py).
    ``scale`` (default ``head_dim ** -0.5``) and ``softcap``: as :class:`LayerAttention`'s.
    """
    query_len, key_len = query.shape[-2], keys.shape[-2]
    query_padding, key_padding = (bucket(query_len) - query_len, bucket(key_len) - key_len) if bucketed else (0, 0)
    if query_padding or key_padding:
        query = F.pad(query, (0, 0, 0, query_padding))
        keys, values = F.pad(keys, (0, 0, 0, key_padding)), F.pad(values, (0, 0, 0, key_padding))
        bias = F.pad(bias, (0, 0, 0, query_padding if bias.shape[-2] != 1 else 0))
        bias = F.pad(bias, (0, key_padding), value=float("-inf"))  # padded keys get no weight
    scores = torch.matmul(query, keys.transpose(-1, -2)).float()
    scores = scores.mul_(query.shape[-1] ** -0.5 if scale is None else scale)
    if softcap:
        scores = scores.div_(softcap).tanh_().mul_(softcap)
    scores = scores.add_(bias)
    return torch.matmul(scores.softmax(dim=-1).to(values.dtype), values)[..., :query_len, :]


#: A prefill chunk attends with :func:`grouped_attention` when its query length x
#: context length is at most this (per head, 4 bytes a score), else with SDPA.
MAX_GROUPED_SCORES = 512 * 512


@dataclass(frozen=True)
class PrefillSegment:
    """One sequence's chunk of new tokens (more than one token, or its first)."""

    query_start: int
    query_len: int
    context_len: int  # cached tokens before the chunk + the chunk
    #: ``[kv_heads * num_blocks]`` blocks of the cache holding the whole
    #: context; None when nothing was cached before the chunk.
    gather_blocks: torch.Tensor | None
    #: ``[query_len, context_len]`` bool, True where a query may attend; None: plain
    #: causal. Set for chunks attended with SDPA.
    mask: torch.Tensor | None
    #: ``[query_len, context_len]`` float32, 0 where a query may attend, -inf
    #: elsewhere. Set instead of ``mask`` for chunks attended with :func:`grouped_attention`.
    bias: torch.Tensor | None = None


@dataclass(frozen=True)
class PagedAttentionMetadata:
    """What every layer needs to attend for one step; built once per step."""

    #: ``[kv_heads * T]`` rows of the flat cache where the new keys/values go.
    write_rows: torch.Tensor
    num_decodes: int
    #: ``[num_decodes * kv_heads * max_blocks]`` cache blocks to gather for the decodes.
    decode_gather_blocks: torch.Tensor | None
    #: ``max_blocks * block_size``: the padded context every decode attends over.
    decode_max_context: int
    #: ``[num_decodes, 1, 1, decode_max_context]`` float32, added to the decodes'
    #: attention scores: 0 where a decode may attend, -inf elsewhere.
    decode_bias: torch.Tensor | None
    prefills: tuple[PrefillSegment, ...]
    #: Set instead of the gather fields when the decodes read the cache in place
    #: (:mod:`~lmserve.backends.torch.kernels.attention`, the CPU path): int64
    #: ``[num_decodes, max_blocks]`` block tables and ``[num_decodes]`` context lengths.
    decode_block_tables: torch.Tensor | None = None
    decode_context_lens: torch.Tensor | None = None
    #: For a model whose layers attend over different windows (Gemma): this step's metadata
    #: for its sliding-window layers (their masks and biases cut to the window); this one is
    #: then the full-attention layers'. None where every layer attends alike.
    sliding: PagedAttentionMetadata | None = None


class DecodeTables(NamedTuple):
    """A step of decodes only, described by block tables: what :func:`paged_decode_attention`
    needs, all tensors (with shapes that do not depend on the contexts' lengths beyond the
    tables' width), so the compiled step (CPU) and the decode graphs (CUDA) can take it."""

    #: ``[kv_heads * num_decodes]`` rows of the flat cache where the new keys/values go.
    write_rows: torch.Tensor
    #: int64 ``[num_decodes, max_blocks]``, padded with the null block.
    block_tables: torch.Tensor
    #: int64 ``[num_decodes]``: each context's length, the new token included.
    context_lens: torch.Tensor
    #: Gather the tables' blocks and attend with torch (any device) rather than read the
    #: cache in place with the Numba kernel (the CPU's float32 and bfloat16 caches).
    gather: bool = False


def paged_decode_attention(flat_keys: torch.Tensor, flat_values: torch.Tensor, meta: DecodeTables,
                           query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                           block_size: int, layer: LayerAttention = PLAIN) -> torch.Tensor:
    """:func:`paged_attention` for a step of decodes given by block tables: one operator
    (``lmserve::paged_decode_attention``) stores the keys/values and attends, or, with
    ``meta.gather``, :func:`gathered_decode_attention`."""
    if meta.gather:
        return gathered_decode_attention(flat_keys, flat_values, meta, query, keys, values, block_size, layer)
    return torch.ops.lmserve.paged_decode_attention(query, keys, values, flat_keys, flat_values, meta.write_rows,
                                                    meta.block_tables, meta.context_lens, block_size,
                                                    layer.window, _scale(layer, query), layer.softcap)


def _scale(layer: LayerAttention, query: torch.Tensor) -> float:
    return query.shape[-1] ** -0.5 if layer.scale is None else layer.scale


def gathered_decode_attention(flat_keys: torch.Tensor, flat_values: torch.Tensor, meta: DecodeTables,
                              query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                              block_size: int, layer: LayerAttention = PLAIN) -> torch.Tensor:
    """Store the decodes' keys/values, gather every block of their tables (padding
    included) and attend with torch's SDPA under a mask built on the device from the
    context lengths: torch ops only, shapes fixed by the tables' shape, no value read
    back to the host, so a CUDA graph can capture it. ``[n, heads * head_dim]``."""
    num_decodes, num_heads, head_dim = query.shape
    num_kv_heads = keys.shape[1]
    flat_keys.index_copy_(0, meta.write_rows, keys.transpose(0, 1).reshape(-1, head_dim))
    flat_values.index_copy_(0, meta.write_rows, values.transpose(0, 1).reshape(-1, head_dim))
    blocks_per_head = flat_keys.shape[0] // (num_kv_heads * block_size)
    width = meta.block_tables.shape[1]
    heads = torch.arange(num_kv_heads, device=query.device) * blocks_per_head
    rows = (heads[None, :, None] + meta.block_tables[:, None, :]).reshape(-1)
    shape = (num_decodes, num_kv_heads, width * block_size, head_dim)
    context_keys = flat_keys.view(-1, block_size * head_dim).index_select(0, rows).view(shape)
    context_values = flat_values.view(-1, block_size * head_dim).index_select(0, rows).view(shape)
    position = torch.arange(width * block_size, device=query.device)[None, :]
    allowed = position < meta.context_lens[:, None]
    if layer.window:
        allowed &= position >= meta.context_lens[:, None] - layer.window
    # Each kv head's query group plays the part of a query sequence (no key/value repetition).
    grouped = query.reshape(num_decodes, num_kv_heads, num_heads // num_kv_heads, head_dim)
    if layer.softcap:
        out = grouped_attention(grouped, context_keys, context_values, _bias(allowed[:, None, None, :]),
                                scale=layer.scale, softcap=layer.softcap)
    else:
        out = F.scaled_dot_product_attention(grouped, context_keys, context_values,
                                             attn_mask=allowed[:, None, None, :], scale=layer.scale)
    return out.reshape(num_decodes, -1)


def paged_attention(flat_keys: torch.Tensor, flat_values: torch.Tensor, meta: PagedAttentionMetadata,
                    query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                    block_size: int, layer: LayerAttention = PLAIN) -> torch.Tensor:
    """Store the step's keys/values, then attend; returns ``[T, heads * head_dim]``.

    ``flat_keys``/``flat_values``: one layer's cache viewed as
    ``[kv_heads * num_slots, head_dim]``, heads-major, so each (head, block)
    is one contiguous ``block_size * head_dim`` run and contexts are gathered
    a block at a time. ``query``: ``[T, heads, head_dim]``; ``keys`` and
    ``values``: ``[T, kv_heads, head_dim]``. ``meta``'s masks must already be those of
    ``layer.window`` (the cache picks :attr:`PagedAttentionMetadata.sliding` for such layers).
    """
    num_tokens, num_heads, head_dim = query.shape
    flat_keys.index_copy_(0, meta.write_rows, keys.transpose(0, 1).reshape(-1, head_dim))
    flat_values.index_copy_(0, meta.write_rows, values.transpose(0, 1).reshape(-1, head_dim))
    key_blocks = flat_keys.view(-1, block_size * head_dim)
    value_blocks = flat_values.view(-1, block_size * head_dim)
    out = query.new_empty(num_tokens, num_heads * head_dim)
    n = meta.num_decodes
    if n:
        out[:n] = _attend_decodes(meta, query[:n], flat_keys, flat_values, keys.shape[1], block_size, layer)
    for segment in meta.prefills:
        rows = slice(segment.query_start, segment.query_start + segment.query_len)
        out[rows] = _attend_prefill(segment, query[rows], keys[rows], values[rows], key_blocks, value_blocks, layer)
    return out


def _attend_decodes(meta: PagedAttentionMetadata, query: torch.Tensor, flat_keys: torch.Tensor,
                    flat_values: torch.Tensor, num_kv_heads: int, block_size: int,
                    layer: LayerAttention) -> torch.Tensor:
    """:func:`paged_attention`'s ``[n, heads, head_dim]`` decode queries (their keys and
    values already stored): read in place from the block tables, or gathered a block at a
    time and attended with two batched matmuls (fused SDPA on CUDA). ``[n, heads * head_dim]``."""
    if meta.decode_block_tables is not None:
        return _attend_in_place(query, flat_keys, flat_values, meta.decode_block_tables,
                                meta.decode_context_lens, num_kv_heads, block_size, layer)
    n, num_heads, head_dim = query.shape
    shape = (n, num_kv_heads, meta.decode_max_context, head_dim)
    key_blocks = flat_keys.view(-1, block_size * head_dim)
    value_blocks = flat_values.view(-1, block_size * head_dim)
    context_keys = key_blocks.index_select(0, meta.decode_gather_blocks).view(shape)
    context_values = value_blocks.index_select(0, meta.decode_gather_blocks).view(shape)
    # Each kv head's query group plays the part of a query sequence: two
    # batched matmuls for every decode, no key/value repetition.
    q = query.reshape(n, num_kv_heads, num_heads // num_kv_heads, head_dim)
    if q.is_cuda and not layer.softcap:  # fused SDPA there; grouped_attention was measured on the CPU only
        o = F.scaled_dot_product_attention(q, context_keys, context_values,
                                           attn_mask=meta.decode_bias.to(q.dtype), scale=layer.scale)
    else:
        o = grouped_attention(q, context_keys, context_values, meta.decode_bias, scale=layer.scale,
                              softcap=layer.softcap)
    return o.reshape(n, -1)


def _attend_prefill(segment: PrefillSegment, query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                    key_blocks: torch.Tensor, value_blocks: torch.Tensor, layer: LayerAttention) -> torch.Tensor:
    """One prefill chunk of :func:`paged_attention`: its ``[L, heads, head_dim]`` queries over
    its own new ``keys``/``values`` (nothing cached before it) or over its whole context,
    gathered from the cache's ``[blocks, block_size * head_dim]`` views. ``[L, heads * head_dim]``."""
    length, _, head_dim = query.shape
    num_kv_heads = keys.shape[1]
    if segment.gather_blocks is None:
        k, v = keys.transpose(0, 1), values.transpose(0, 1)
    else:
        shape = (num_kv_heads, -1, head_dim)
        k = key_blocks.index_select(0, segment.gather_blocks).view(shape)[:, : segment.context_len]
        v = value_blocks.index_select(0, segment.gather_blocks).view(shape)[:, : segment.context_len]
    bias = segment.bias
    if bias is None and layer.softcap:  # soft-capped scores: explicit matmuls, whatever the length
        allowed = segment.mask if segment.mask is not None else torch.ones(
            length, segment.context_len, dtype=torch.bool, device=query.device).tril_(segment.context_len - length)
        bias = _bias(allowed)
    if bias is not None:
        q = query.view(length, num_kv_heads, -1, head_dim).permute(1, 2, 0, 3)
        # [kv, group, L, hd]
        o = grouped_attention(q, k.unsqueeze(1), v.unsqueeze(1), bias, bucketed=True, scale=layer.scale,
                              softcap=layer.softcap)
        return o.permute(2, 0, 1, 3).reshape(length, -1)
    o = batched_sdpa(query.transpose(0, 1), k, v, mask=segment.mask, is_causal=segment.mask is None,
                     scale=layer.scale)
    return o.transpose(0, 1).reshape(length, -1)


#: Cache dtypes the in-place decodes read.
IN_PLACE_DECODE_DTYPES = (torch.float32, torch.bfloat16)


def _as_numpy(tensor: torch.Tensor) -> np.ndarray:
    """A CPU float32 tensor as numpy's float32, a bfloat16 one as its uint16 bits (no copy)."""
    return tensor.view(torch.int16).numpy().view(np.uint16) if tensor.dtype == torch.bfloat16 else tensor.numpy()


def _attend_in_place(query: torch.Tensor, flat_keys: torch.Tensor, flat_values: torch.Tensor,
                     block_tables: torch.Tensor, context_lens: torch.Tensor, num_kv_heads: int,
                     block_size: int, layer: LayerAttention, new_keys: torch.Tensor | None = None,
                     new_values: torch.Tensor | None = None, write_rows: torch.Tensor | None = None) -> torch.Tensor:
    """The decodes' attention read straight from the (CPU) cache, after storing their
    ``new_keys``/``new_values`` at ``write_rows`` if given; ``[n, heads * head_dim]`` float32."""
    num_decodes, num_heads, head_dim = query.shape
    grouped = query.reshape(num_decodes, num_kv_heads, num_heads // num_kv_heads, head_dim)
    out = np.empty(grouped.shape, np.float32)
    key_blocks = _as_numpy(flat_keys).reshape(-1, block_size, head_dim)
    value_blocks = _as_numpy(flat_values).reshape(-1, block_size, head_dim)
    if write_rows is None:
        new_keys = new_values = np.empty((0, 0, 0), key_blocks.dtype)
        rows = np.empty(0, np.int64)
    else:
        new_keys, new_values, rows = _as_numpy(new_keys), _as_numpy(new_values), write_rows.numpy()
    store_and_decode_attention(_as_numpy(grouped), new_keys, new_values, rows, key_blocks, value_blocks,
                               block_tables.numpy(), context_lens.numpy(), out, window=layer.window,
                               scale=layer.scale, softcap=layer.softcap)
    return torch.from_numpy(out).view(num_decodes, -1)


def _store_and_attend_in_place(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                               flat_keys: torch.Tensor, flat_values: torch.Tensor, write_rows: torch.Tensor,
                               block_tables: torch.Tensor, context_lens: torch.Tensor, block_size: int,
                               window: int, scale: float, softcap: float) -> torch.Tensor:
    out = _attend_in_place(query, flat_keys, flat_values, block_tables, context_lens, keys.shape[1], block_size,
                           LayerAttention(window, scale, softcap), keys, values, write_rows)
    return out.to(query.dtype)


def _store_and_attend_shape(query: torch.Tensor, *args) -> torch.Tensor:
    return query.new_empty(query.shape[0], query.shape[1] * query.shape[2])


define_op("paged_decode_attention(Tensor query, Tensor keys, Tensor values, Tensor(a!) flat_keys, "
          "Tensor(b!) flat_values, Tensor write_rows, Tensor block_tables, Tensor context_lens, "
          "SymInt block_size, SymInt window, float scale, float softcap) -> Tensor", _store_and_attend_in_place, _store_and_attend_shape)
