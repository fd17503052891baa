"""Tensor parallelism: one rank's place in the group, its collectives, and its part of each weight.

A model split over N ranks (``--tp N``) follows Megatron's split, as nano-vllm's and
gpt-fast's layers do:

- q/k/v and gate/up are *column-parallel*: each rank holds some output rows (its
  attention heads, its part of the MLP), computes them, and needs nothing from the others;
- o_proj and down_proj are *row-parallel*: each rank holds the input columns that match
  its heads or MLP part, computes a partial sum, and one all-reduce adds the ranks' sums;
- the embedding and ``lm_head`` are *vocabulary-parallel*: each rank holds a slice of
  the vocabulary; looked-up rows are all-reduced, logits are gathered.

Each rank keeps the key/value heads its query heads read. When there are more ranks
than key/value heads, ranks share a key/value head and each holds a copy (as LMDeploy
does); so ``N`` must divide the query heads, and divide or be a multiple of the kv heads.

Rank 0 runs the engine (scheduler, block manager, sampling) and sends every step's plan
to the other ranks over a *control* group (gloo, no timeout: an idle server sends
nothing); the forward's collectives run on the *data* group (gloo on the CPU, NCCL on
CUDA) with a finite timeout, so a rank that hangs fails the step instead of the server.
When every rank is on one machine, plans and the CPU's collectives go through shared
memory instead (:mod:`~lmserve.backends.torch.shared_memory_group`), where they fit.
"""

from __future__ import annotations

import dataclasses
import datetime
import gc
import logging
from dataclasses import dataclass
from typing import Any, Callable

import torch

from lmserve.backends.torch.shared_memory_group import SharedMemoryGroup

logger = logging.getLogger(__name__)

#: The control group waits for the next step however long the server stays idle.
CONTROL_TIMEOUT = datetime.timedelta(days=365)


@dataclass(frozen=True)
class WeightSlice:
    """The part of a full weight one rank holds: ``length`` rows (or columns, ``dim`` 1)
    from ``start``; rows past the end of the full tensor are zeros (a vocabulary padded
    to a multiple of the ranks)."""

    dim: int
    start: int
    length: int

    def take(self, tensor: torch.Tensor) -> torch.Tensor:
        available = max(0, min(self.length, tensor.shape[self.dim] - self.start))
        part = tensor.narrow(self.dim, self.start, available)
        if available == self.length:
            return part
        shape = list(tensor.shape)
        shape[self.dim] = self.length - available
        return torch.cat([part, tensor.new_zeros(shape)], dim=self.dim)


def valid_sizes(num_heads: int, num_kv_heads: int) -> list[int]:
    """The ranks a model with these heads splits over: divisors of the query heads that
    divide, or are multiples of, the key/value heads."""
    return [n for n in range(1, num_heads + 1)
            if num_heads % n == 0 and (num_kv_heads % n == 0 or n % num_kv_heads == 0)]


def check_size(size: int, num_heads: int, num_kv_heads: int) -> None:
    """Refuse a ``--tp`` the model's heads do not split over, naming the sizes that do."""
    if size < 1:
        raise ValueError(f"--tp must be at least 1, got {size}.")
    sizes = valid_sizes(num_heads, num_kv_heads)
    if size not in sizes:
        raise ValueError(
            f"--tp {size} does not split this model's {num_heads} attention heads and {num_kv_heads} key/value "
            f"heads evenly; valid sizes: {', '.join(map(str, sizes))}.")


class TensorParallel:
    """One rank's view of the group. The single-device instance (:data:`SINGLE`) has
    one rank, holds every weight whole, and its collectives do nothing."""

    def __init__(self, rank: int = 0, world_size: int = 1, data_group: Any = None, control_group: Any = None,
                 local: SharedMemoryGroup | None = None):
        """``local``: the ranks' shared memory, when all of them are on this machine (CPU)."""
        self.rank = rank
        self.world_size = world_size
        self.data_group = data_group
        self.control_group = control_group
        self.local = local
        self._on_failure: Callable[[str], None] | None = None
        self.failure: str | None = None
        if local is not None:
            local.check = lambda: self.failure

    @property
    def is_parallel(self) -> bool:
        return self.world_size > 1

    # ------------------------------------------------------------ which part is mine

    def split(self, size: int) -> tuple[int, int]:
        """``(start, length)`` of this rank's contiguous part of ``size`` (the first ranks
        take one more when it does not divide)."""
        base, extra = divmod(size, self.world_size)
        start = self.rank * base + min(self.rank, extra)
        return start, base + (self.rank < extra)

    def padded_split(self, size: int) -> tuple[int, int]:
        """``(start, length)`` of this rank's part when ``size`` is padded to a multiple
        of the ranks: every rank's part has the same length (gathered side by side)."""
        length = -(-size // self.world_size)
        return self.rank * length, length

    def heads(self, num_heads: int) -> tuple[int, int]:
        """``(first, count)`` of this rank's query heads."""
        count = num_heads // self.world_size
        return self.rank * count, count

    def kv_heads(self, num_kv_heads: int) -> tuple[int, int]:
        """``(first, count)`` of the key/value heads this rank's query heads read
        (one shared head when ranks outnumber the kv heads)."""
        if num_kv_heads >= self.world_size:
            count = num_kv_heads // self.world_size
            return self.rank * count, count
        return self.rank * num_kv_heads // self.world_size, 1

    # ------------------------------------------------------------ collectives

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """The sum of every rank's ``x`` (in place)."""
        if not self.is_parallel:
            return x
        if self.local is not None and self.local.fits(x):
            return self.local.all_reduce(x)
        torch.distributed.all_reduce(x, group=self.data_group)
        return x

    def gather_columns(self, x: torch.Tensor) -> torch.Tensor:
        """``[T, n]`` on every rank -> ``[T, n * world_size]``, the ranks' columns side by side."""
        if not self.is_parallel:
            return x
        if self.local is not None and self.local.fits(x):
            return torch.cat(self.local.all_gather(x), dim=-1)
        parts = [torch.empty_like(x) for _ in range(self.world_size)]
        torch.distributed.all_gather(parts, x.contiguous(), group=self.data_group)
        return torch.cat(parts, dim=-1)

    def agree_min(self, value: int) -> int:
        """The smallest of every rank's ``value`` (e.g. how many KV blocks fit)."""
        if not self.is_parallel:
            return value
        tensor = torch.tensor([value], dtype=torch.int64)
        torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.MIN, group=self.control_group)
        return int(tensor.item())

    def send_plan(self, plan: Any) -> None:
        """Rank 0: hand the step's plan (None: stop) to the other ranks."""
        if self.local is not None and self.local.send_plan(plan):
            return
        torch.distributed.broadcast_object_list([plan], src=0, group=self.control_group)

    def receive_plan(self) -> Any:
        """Ranks 1..N-1: wait for rank 0's next plan."""
        if self.local is not None:
            return self.local.receive_plan(elsewhere=self._receive_plan_from_group)
        return self._receive_plan_from_group()

    def _receive_plan_from_group(self) -> Any:
        box = [None]
        torch.distributed.broadcast_object_list(box, src=0, group=self.control_group)
        return box[0]

    def leave(self) -> None:
        """Leave the process group (this process may join another later).

        The groups are destroyed here, by the thread that leaves, and this rank lets go
        of them, so that nothing of them is left to the interpreter's teardown: a clean
        shutdown of two nodes now and then ended in SIGABRT at exit (``terminate called
        without an active exception``, with no Python thread running)."""
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        self.data_group = self.control_group = None
        gc.collect()  # a group held in a reference cycle goes now, not at the teardown

    # ------------------------------------------------------------ failure

    def on_failure(self, handler: Callable[[str], None]) -> None:
        """Call ``handler(message)`` once, the first time the group fails (:meth:`fail`)."""
        self._on_failure = handler
        if self.failure is not None:
            handler(self.failure)

    def fail(self, message: str) -> None:
        """Mark the group broken: a rank died, or a collective failed or timed out. Every
        later step would fail too, so whoever listens ends the server."""
        if self.failure is not None:
            return
        self.failure = message
        logger.error("Tensor parallelism failed: %s", message)
        if self._on_failure is not None:
            self._on_failure(message)


def move_to(value: Any, device: torch.device) -> Any:
    """``value`` with every tensor in it (in tuples, named tuples and dataclasses) on ``device``."""
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, tuple):
        moved = [move_to(item, device) for item in value]
        return type(value)(*moved) if hasattr(value, "_fields") else tuple(moved)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.replace(value, **{field.name: move_to(getattr(value, field.name), device)
                                             for field in dataclasses.fields(value) if field.init})
    return value


#: One device, every weight whole.
SINGLE = TensorParallel()
