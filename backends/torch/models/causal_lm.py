"""What every family's model is: embeddings, a stack of decoder layers, a final norm and
the output projection, with the methods the engine calls.

A family's module subclasses :class:`CausalLM` and says how one of its layers is wired
(:meth:`CausalLM.make_layer`); where it differs beyond that (Gemma's scaled embeddings,
soft-capped logits, two rotary bases) it overrides the one method that differs.
Parameter names follow HF transformers (``model.layers.N.self_attn.q_proj.weight``...),
so an HF checkpoint's tensors load by name. The code is device-agnostic.

Tokens are a flat ``[T]`` batch with their positions; everything attention needs
beyond that comes from the KV cache (an :class:`AttentionCache`) and the metadata it
reads, which the model passes through unread.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from lmserve.backends.torch.attention_cache import AttentionCache, MetadataT
from lmserve.backends.torch.model_config import ModelConfig
from lmserve.backends.torch.models.linear import column_parallel_linear, make_embedding
from lmserve.backends.torch.models.norms import RMSNorm
from lmserve.backends.torch.models.rotary import RotaryEmbedding
from lmserve.backends.torch.tensor_parallel import SINGLE, TensorParallel, WeightSlice


class CausalLM(nn.Module):
    """A decoder-only language model (this rank's part of it under tensor parallelism).

    Built by the weight loader (on the meta device, then filled); a test may build one
    directly with random weights. Subclasses implement :meth:`make_layer`: a module
    called as ``layer(x, rope, kv_cache, metadata) -> x`` (``rope``: what
    :meth:`position_embeddings` returns).
    """

    #: The final norm's class (Gemma's adds one to its weight).
    norm_class: type[nn.Module] = RMSNorm
    #: Whether a decode step runs the same operations whatever its tokens, as the compiled
    #: decode step (one traced graph) and CUDA's decode graphs need. False: the engine runs
    #: every step eagerly (a mixture of experts runs only the experts its tokens chose).
    compiled_decodes: bool = True

    def __init__(self, config: ModelConfig, parallel: TensorParallel = SINGLE):
        super().__init__()
        self.config = config
        self.parallel = parallel
        self.model = nn.Module()
        self.model.embed_tokens = make_embedding(config.vocab_size, config.hidden_size, parallel)
        self.model.layers = nn.ModuleList(self.make_layer(config, i, parallel)
                                          for i in range(config.num_hidden_layers))
        self.model.norm = self.norm_class(config.hidden_size, config.rms_norm_eps)
        self.model.rotary_emb = RotaryEmbedding(config)
        self.lm_head = column_parallel_linear(config.hidden_size, parallel.padded_split(config.vocab_size))
        self.tie_weights()

    def make_layer(self, config: ModelConfig, layer_idx: int, parallel: TensorParallel) -> nn.Module:
        raise NotImplementedError

    def fuse_projections(self) -> None:
        """Fuse each layer's q/k/v and gate/up into single matmuls (the engine does this
        after loading): every submodule that can, does."""
        for module in list(self.modules()):
            if module is not self and hasattr(module, "fuse_projections"):
                module.fuse_projections()

    def tie_weights(self) -> None:
        """Share the embedding matrix with ``lm_head`` when the config says so
        (again after moving the model, which can untie them)."""
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def reset_buffers(self) -> None:
        """Recompute computed buffers (rotary frequencies) in float32 on their device, after
        the model was built on the meta device."""
        for module in self.modules():
            if isinstance(module, RotaryEmbedding):
                module.reset_parameters()

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                kv_cache: AttentionCache[MetadataT], metadata: MetadataT | None = None) -> torch.Tensor:
        """Run ``input_ids`` (``[T]``) at ``positions`` (``[T]``), storing their
        keys/values in ``kv_cache``; earlier positions must be cached already.
        Returns the final-norm hidden states ``[T, hidden]``.

        ``metadata`` describes the batch for the cache's ``attend`` (the paged
        engine builds it per step); None asks a one-sequence cache (the tests'
        reference cache, ``tests/reference_kv_cache.py``) to derive it from
        ``positions``."""
        if metadata is None:
            metadata = kv_cache.attention_metadata(positions)
        return self.hidden_states(input_ids, positions, kv_cache, metadata)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_tokens(input_ids)

    def position_embeddings(self, positions: torch.Tensor, dtype: torch.dtype) -> Any:
        """What every layer gets for the step's positions: the cos/sin tables."""
        return self.model.rotary_emb(positions, dtype)

    def hidden_states(self, input_ids: torch.Tensor, positions: torch.Tensor,
                      kv_cache: AttentionCache[MetadataT], metadata: MetadataT) -> torch.Tensor:
        """:meth:`forward` without its inference-mode wrapper, for ``torch.compile``
        (which traces it from inside the caller's inference mode)."""
        x = self.embed(input_ids)
        rope = self.position_embeddings(positions, x.dtype)
        for layer in self.model.layers:
            x = layer(x, rope, kv_cache, metadata)
        return self.model.norm(x)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """This rank's logits of ``hidden`` in the model's dtype (soft-capped where the
        config says so); traced by the compiled decode step."""
        logits = self.lm_head(hidden)
        cap = self.config.final_logit_softcapping
        if cap:
            logits = torch.tanh(logits / cap) * cap
        return logits

    @torch.inference_mode()
    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """``[N, hidden]`` -> ``[N, vocab]`` logits in the model's dtype; pass
        only the rows whose next token is wanted (e.g. the last one). Under tensor
        parallelism every rank computes its slice of the vocabulary and gets all of them."""
        logits = self.logits(hidden)
        if self.parallel.is_parallel:
            logits = self.parallel.gather_columns(logits)[:, : self.config.vocab_size]
        return logits

    def weight_slices(self) -> dict[str, WeightSlice]:
        """By parameter name, the part of the full tensor each parameter holds (only
        the parameters of a model split by tensor parallelism)."""
        if not self.parallel.is_parallel:
            return {}
        return {f"{module_name}.{name}": part for module_name, module in self.named_modules()
                for name, part in getattr(module, "shard", {}).items()}
