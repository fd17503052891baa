"""What the model asks of a KV cache, whichever cache it is.

The model touches a cache in one place: ``attend(layer_idx, metadata, query,
keys, values)`` once per layer, which stores the step's keys and values and
returns the attention output. ``metadata`` describes the batch in the cache's
own terms, built once per forward pass before the first layer; the model
passes it through unread. Two caches satisfy :class:`AttentionCache`:

- the engine's :class:`~lmserve.backends.torch.paged_cache.PagedKVCache`, with
  the :class:`~lmserve.backends.torch.attention.PagedAttentionMetadata` the
  model runner builds per step;
- the tests' one-sequence reference cache (``tests/reference_kv_cache.py``),
  which can also derive its metadata from the positions (``attention_metadata``).
"""

from __future__ import annotations

from typing import Protocol, TypeVar

import torch

#: The batch description a cache reads (each cache has its own).
MetadataT = TypeVar("MetadataT")
_MetadataT_contra = TypeVar("_MetadataT_contra", contravariant=True)


class AttentionCache(Protocol[_MetadataT_contra]):
    """A KV cache the model can attend through, described by metadata of its own type."""

    def attend(self, layer_idx: int, metadata: _MetadataT_contra, query: torch.Tensor,
               keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """Store the new tokens' ``keys``/``values`` (``[T, kv_heads, head_dim]``) in
        layer ``layer_idx``, then attend with ``query`` (``[T, heads, head_dim]``);
        returns ``[T, heads * head_dim]``."""
        ...
