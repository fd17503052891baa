"""The engine's KV cache: fixed-size blocks shared by every sequence.

Per layer, keys and values live in ``[kv_heads, num_blocks * block_size,
head_dim]`` tensors (heads-major), addressed by *slot* = ``block_id *
block_size + offset``. Which blocks a sequence owns is the block manager's
business; the model runner turns block tables into slot rows once per step,
and every layer reuses them (:class:`PagedAttentionMetadata`).

Under tensor parallelism each rank holds only its own kv heads; nothing here
assumes it holds all of them.
"""

from __future__ import annotations

import torch

from lmserve.backends.torch.attention import (
    DecodeTables,
    LayerAttention,
    PagedAttentionMetadata,
    layer_attention,
    paged_attention,
    paged_decode_attention,
)
from lmserve.backends.torch.model_config import ModelConfig


class PagedKVCache:
    def __init__(self, num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int,
                 head_dim: int, dtype: torch.dtype, device: torch.device | str,
                 layers: tuple[LayerAttention, ...] = ()):
        """``layers``: how each layer attends (its window, scale, soft-cap); default: plainly."""
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"need at least one block of at least one token, got {num_blocks} x {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.layers = layers or (LayerAttention(),) * num_layers
        # One more block than the block manager hands out: the null block, that padding
        # points at. Zero, except where the padding rows of a decode graph write their
        # (finite) keys and values; attention reads it only at masked positions, or for
        # those padding rows.
        self.null_block = num_blocks
        self.num_slots = (num_blocks + 1) * block_size
        #: The bytes one block holds on this rank (keys and values of every layer).
        self.block_bytes = _block_bytes(num_layers, num_kv_heads, head_dim, block_size, dtype)
        # torch.empty: on the CPU, pages are only committed once a block is used.
        # Blocks are cleared when first handed out (clear_blocks): a masked position
        # still multiplies its value by 0, and leftover memory may hold NaN.
        shape = (num_kv_heads * self.num_slots, head_dim)
        self.keys = [torch.empty(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.values = [torch.empty(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.clear_blocks([self.null_block])

    @classmethod
    def allocate(cls, config: ModelConfig, num_blocks: int, block_size: int, dtype: torch.dtype,
                 device: torch.device | str) -> PagedKVCache:
        return cls(config.num_hidden_layers, num_blocks, block_size, config.num_key_value_heads,
                   config.head_dim, dtype, device, layer_attention(config))

    def clear_blocks(self, blocks: list[int]) -> None:
        """Zero ``blocks`` in every layer; called before a step uses newly handed-out blocks."""
        if not blocks:
            return
        index = torch.as_tensor(blocks, dtype=torch.long, device=self.keys[0].device)
        for tensor in (*self.keys, *self.values):
            tensor.view(self.num_kv_heads, -1, self.block_size * self.head_dim).index_fill_(1, index, 0)

    @staticmethod
    def bytes_per_block(config: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
        return _block_bytes(config.num_hidden_layers, config.num_key_value_heads, config.head_dim, block_size, dtype)

    def attend(self, layer_idx: int, metadata: PagedAttentionMetadata | DecodeTables, query: torch.Tensor,
               keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """Called by each attention layer: store the step's keys/values and attend."""
        layer = self.layers[layer_idx]
        if isinstance(metadata, DecodeTables):
            return paged_decode_attention(self.keys[layer_idx], self.values[layer_idx], metadata, query, keys,
                                          values, self.block_size, layer)
        if layer.window and metadata.sliding is not None:
            metadata = metadata.sliding
        return paged_attention(self.keys[layer_idx], self.values[layer_idx], metadata, query, keys, values,
                               self.block_size, layer)


def _block_bytes(num_layers: int, num_kv_heads: int, head_dim: int, block_size: int, dtype: torch.dtype) -> int:
    """Keys and values of every layer for one block."""
    return 2 * num_layers * num_kv_heads * head_dim * block_size * torch.tensor([], dtype=dtype).element_size()
