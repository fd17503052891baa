"""What the torch engine is asked to be: the one place its settings and their defaults live.

:class:`EngineConfig` is torch-free, so the plugin's command-line options read their
defaults from it without importing torch (``lmserve plugins`` stays fast), and
:meth:`EngineConfig.from_options` builds it from the parsed flags; nothing else
writes a default down again.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterable

from lmserve.core.config import (
    QUANTIZATION_CHOICES,
    QUANTIZATIONS,
    ServeConfig,
    settings_from_options,
)

if TYPE_CHECKING:
    from lmserve.backends.torch.models.family import ModelFamily

#: Fields whose command-line option has another dest name (``--tp``).
OPTION_NAMES = {"tensor_parallel_size": "tp"}
#: Fields that come from :class:`ServeConfig` itself, not from its plugin-added options.
SERVE_FIELDS = ("device", "dtype", "session_len")


def check_quantization(method: str, choices: tuple[str, ...] = QUANTIZATIONS) -> None:
    """Refuse a method not in ``choices`` with the flag's message."""
    if method not in choices:
        raise ValueError(f"--quantization must be one of {', '.join(choices)}, got {method!r}.")


@dataclass(frozen=True)
class EngineConfig:
    """The torch engine's settings, one per flag of the plugin's "torch engine" and
    "tensor parallelism" groups (``--tp``: ``tensor_parallel_size``); validated on
    construction with the flags' names in the messages."""

    device: str = "auto"
    dtype: str = "auto"
    session_len: int | None = None
    cache_max_entry_count: float = 0.8
    cache_block_seq_len: int = 64
    max_batch_size: int = 128
    max_prefill_token_num: int = 4096
    enable_prefix_caching: bool = False
    #: Weight-only quantization of the linear layers: ``int8``, ``int4``, ``none`` (the
    #: dtype's weights; None says the same) or ``auto`` (a quantized GGUF file's own
    #: precision, on the CPU).
    quantization: str | None = "auto"
    #: Run every step eagerly, op by op, instead of the compiled decode step (CPU) or the
    #: decode steps' CUDA graphs (GPU).
    enforce_eager: bool = False
    #: A request's tokens do not depend on the other requests in its steps (``--batch-invariant``):
    #: every row of a step is computed the same way whatever the batch (see docs/performance.md).
    batch_invariant: bool = False
    #: Ranks the model is split over (``--tp``), on ``nnodes`` machines; this one is
    #: ``node_rank``; the group meets at ``master_addr:master_port`` (None: a free port, one node).
    tensor_parallel_size: int = 1
    nnodes: int = 1
    node_rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: int | None = None
    #: Seconds a collective of the forward may wait for the other ranks before the group fails.
    tp_timeout: float = 30.0
    #: torch and Numba threads per rank on the CPU; None: the machine's cores shared by its ranks.
    cpu_threads: int | None = None
    #: The families a checkpoint's architecture is looked up in, first match wins
    #: (:hook:`lmserve_model_families`); empty: the built-in ones.
    model_families: tuple[ModelFamily, ...] = ()

    @classmethod
    def from_options(cls, config: ServeConfig, model_families: Iterable[ModelFamily] = ()) -> EngineConfig:
        """The engine ``config`` asks for: device, dtype and session length from the
        config itself, the rest from its options by dest name (``--tp`` for
        ``tensor_parallel_size``); an option absent or None takes the field's default."""
        return settings_from_options(cls, config.options, OPTION_NAMES, model_families=tuple(model_families),
                                     **{name: getattr(config, name) for name in SERVE_FIELDS})

    def __post_init__(self) -> None:
        count = self.cache_max_entry_count
        if not (0 < count < 1 or (count >= 1 and float(count).is_integer())):
            raise ValueError(
                f"--cache-max-entry-count must be a fraction in (0, 1) or a whole number of blocks >= 1, got {count}."
            )
        for name in ("cache_block_seq_len", "max_batch_size", "max_prefill_token_num"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}.")
        if self.tensor_parallel_size < 1:
            raise ValueError(f"--tp must be at least 1, got {self.tensor_parallel_size}.")
        if self.cpu_threads is not None and self.cpu_threads < 1:
            raise ValueError(f"--cpu-threads must be at least 1, got {self.cpu_threads}.")
        if not self.tp_timeout > 0:
            raise ValueError(f"--tp-timeout must be above 0 seconds, got {self.tp_timeout}.")
        if self.nnodes < 1 or self.tensor_parallel_size % self.nnodes:
            raise ValueError(f"--nnodes must divide --tp (the ranks are shared equally by the nodes), got "
                             f"--tp {self.tensor_parallel_size} and --nnodes {self.nnodes}.")
        if not 0 <= self.node_rank < self.nnodes:
            raise ValueError(f"--node-rank must be in [0, {self.nnodes - 1}], got {self.node_rank}.")
        if self.nnodes > 1 and self.master_port is None:
            raise ValueError("--master-port is needed with --nnodes above 1 (every node names the same one).")
        if self.quantization is None:
            object.__setattr__(self, "quantization", "none")
        check_quantization(self.quantization, QUANTIZATION_CHOICES)
