"""The reference key/value cache for tests: one sequence, contiguous.

The server never uses it (it serves from the paged cache, ``paged_cache.py``);
tests run a model through it to check the paged engine and each model family
against the plainest cache that can be written.

Each layer owns a ``[max_seq_len, num_kv_heads, head_dim]`` key tensor and a
value tensor of the same shape; the keys and values of the token at position
``p`` live in row ``p``. A forward pass of T new tokens (a whole prompt, a
chunk of one, or one decoded token) writes its rows and attends over
positions ``[0, last position]`` under a causal mask.

The model touches a cache in one place: ``attend(layer_idx, metadata, q, k,
v)`` once per layer, which stores the new keys/values and returns the
attention output. The paged cache of the engine offers the same method (both
are an ``AttentionCache``: ``backends/torch/attention_cache.py``); this
one-sequence cache is the simple reference.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lmserve.backends.torch.attention import LayerAttention, attention, layer_attention
from lmserve.backends.torch.model_config import ModelConfig


@dataclass(frozen=True)
class AttentionMetadata:
    """What every layer needs to attend for one forward pass.

    ``positions``: ``[T]`` positions of the new tokens. ``context_len``: keys
    at positions ``[0, context_len)`` take part. ``mask``: ``[T, context_len]``
    bool, True where a query may attend a key; None when every query may
    attend every key (one decoded token, no sliding window). ``sliding_mask``: the
    same cut to the sliding window, for the layers that have one (None: no such layer).
    """

    positions: torch.Tensor
    context_len: int
    mask: torch.Tensor | None
    sliding_mask: torch.Tensor | None = None


class KVCache:
    """Keys and values of one sequence, for every layer.

    Created by :meth:`allocate` when a sequence starts; :meth:`reset` before
    the cache is reused for another sequence.
    """

    def __init__(self, key_caches: list[torch.Tensor], value_caches: list[torch.Tensor],
                 layers: tuple[LayerAttention, ...] = ()):
        """``layers``: how each layer attends (default: plainly); the sliding layers share one window."""
        if len(key_caches) != len(value_caches) or not key_caches:
            raise ValueError("need one key and one value tensor per layer")
        self.key_caches = key_caches
        self.value_caches = value_caches
        self.layers = layers or (LayerAttention(),) * len(key_caches)
        self.sliding_window = max(layer.window for layer in self.layers) or None
        self.max_seq_len = key_caches[0].shape[0]

    @classmethod
    def allocate(cls, config: ModelConfig, max_seq_len: int, dtype: torch.dtype,
                 device: torch.device | str) -> KVCache:
        """Zeroed caches for ``config``'s layers, room for ``max_seq_len`` positions."""
        if max_seq_len <= 0:
            raise ValueError(f"max_seq_len must be positive, got {max_seq_len}")
        shape = (max_seq_len, config.num_key_value_heads, config.head_dim)

        def zeros() -> list[torch.Tensor]:
            return [torch.zeros(shape, dtype=dtype, device=device)
                    for _ in range(config.num_hidden_layers)]

        return cls(zeros(), zeros(), layer_attention(config))

    def reset(self) -> None:
        """Forget the cached sequence (zero every row)."""
        for tensor in (*self.key_caches, *self.value_caches):
            tensor.zero_()

    def attention_metadata(self, positions: torch.Tensor) -> AttentionMetadata:
        """Called once per forward pass, before the first layer.

        ``positions`` (``[T]``, increasing) are the new tokens' positions; rows
        before them must already hold this sequence's keys and values.
        """
        if positions.dim() != 1 or positions.numel() == 0:
            raise ValueError(f"positions must be a non-empty 1-D tensor, got {tuple(positions.shape)}")
        context_len = int(positions[-1]) + 1  # one host sync per forward pass, not per layer
        if context_len > self.max_seq_len:
            raise ValueError(f"position {context_len - 1} does not fit in a cache of "
                             f"{self.max_seq_len} positions")
        mask = sliding_mask = None
        key_positions = torch.arange(context_len, device=positions.device)
        if positions.numel() > 1:
            mask = key_positions[None, :] <= positions[:, None]
        if self.sliding_window is not None:
            sliding_mask = key_positions[None, :] > positions[:, None] - self.sliding_window
            if mask is not None:
                sliding_mask &= mask
        return AttentionMetadata(positions=positions, context_len=context_len, mask=mask, sliding_mask=sliding_mask)

    def update(self, layer_idx: int, metadata: AttentionMetadata, keys: torch.Tensor,
               values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Called by each layer: store the new tokens' ``keys``/``values``
        (``[T, num_kv_heads, head_dim]``) at their positions and return the
        layer's keys and values for positions ``[0, context_len)``."""
        key_cache, value_cache = self.key_caches[layer_idx], self.value_caches[layer_idx]
        key_cache[metadata.positions] = keys.to(key_cache.dtype)
        value_cache[metadata.positions] = values.to(value_cache.dtype)
        return key_cache[: metadata.context_len], value_cache[: metadata.context_len]

    def attend(self, layer_idx: int, metadata: AttentionMetadata, query: torch.Tensor,
               keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """Store the new keys/values, then attend: ``[T, heads * head_dim]``."""
        all_keys, all_values = self.update(layer_idx, metadata, keys, values)
        layer = self.layers[layer_idx]
        return attention(query, all_keys, all_values, metadata.sliding_mask if layer.window else metadata.mask, layer)
