"""The processes of a tensor-parallel engine: starting the ranks, the headless ranks' loop,
and watching them.

Rank 0 is the server's own engine thread. The other ranks of its node are processes
it spawns; the ranks of other nodes are spawned by ``lmserve serve`` on those nodes
(``--node-rank 1..``), which serve no HTTP. Every rank joins one process group at
``--master-addr:--master-port`` (torchrun's meaning), loads its part of the model and
sizes its KV cache; the number of blocks is the smallest over the ranks. Then the
headless ranks loop: receive the step's plan, run the forward, join the collectives.

Failure is loud: a rank of this node that exits is seen at once (its process
sentinel); a rank elsewhere, by the collective that fails or times out. Either way
the group is marked failed (:meth:`TensorParallel.fail`) and the server ends.
"""

from __future__ import annotations

import datetime
import logging
import multiprocessing
import multiprocessing.connection
import os
import queue
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.multiprocessing  # noqa: F401  (shared-memory tensors pass to spawned ranks)

from lmserve.backends.torch.shared_memory_group import SharedMemoryGroup
from lmserve.backends.torch.tensor_parallel import CONTROL_TIMEOUT, TensorParallel, move_to

if TYPE_CHECKING:
    from lmserve.backends.torch.engine_config import EngineConfig

logger = logging.getLogger(__name__)

#: How long rank 0 waits for a rank to end after it was told to stop.
STOP_TIMEOUT = 10.0


@dataclass(frozen=True)
class RankSpec:
    """Who a rank is and where the group meets."""

    rank: int
    world_size: int
    #: The rank's index on its node (its CUDA device there).
    local_rank: int
    #: ``tcp://host:port`` of the group's rendezvous (node 0).
    init_method: str
    #: torch (and Numba) threads for this rank: the node's cores shared by its ranks.
    threads: int
    #: Seconds a collective of the forward may wait for the other ranks.
    timeout_s: float = 30.0


def node_ranks(config: EngineConfig) -> list[RankSpec]:
    """The ranks ``config.node_rank`` runs, rank 0 (the engine) first on node 0."""
    per_node = config.tensor_parallel_size // config.nnodes
    port = config.master_port or free_port(config.master_addr)
    init_method = f"tcp://{config.master_addr}:{port}"
    threads = config.cpu_threads or max(1, (os.cpu_count() or 1) // per_node)
    first = config.node_rank * per_node
    return [RankSpec(first + i, config.tensor_parallel_size, i, init_method, threads, config.tp_timeout)
            for i in range(per_node)]


def free_port(host: str) -> int:
    with socket.socket() as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


def rank_device(name: str, local_rank: int) -> torch.device:
    """The rank's device: on CUDA, the node's ``local_rank``-th GPU."""
    from lmserve.backends.torch.device import resolve_device

    device = resolve_device(name)
    return torch.device("cuda", local_rank) if device.type == "cuda" else device


def join_group(spec: RankSpec, device: torch.device, local: SharedMemoryGroup | None = None) -> TensorParallel:
    """Join the process group (blocks until every rank has joined): the data group for
    the forward's collectives (NCCL on CUDA, gloo on the CPU), a gloo group for control;
    ``local``: the ranks' shared memory when they are all on this machine."""
    import torch.distributed as dist

    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("gloo", init_method=spec.init_method, world_size=spec.world_size, rank=spec.rank,
                            timeout=CONTROL_TIMEOUT)
    data = dist.new_group(backend="nccl" if device.type == "cuda" else "gloo",
                          timeout=datetime.timedelta(seconds=spec.timeout_s))
    return TensorParallel(spec.rank, spec.world_size, data_group=data, control_group=dist.group.WORLD,
                          local=local if device.type == "cpu" else None)


def use_threads(spec: RankSpec) -> None:
    """Give the calling thread's torch and Numba work the rank's share of the cores."""
    set_threads(spec.threads)


def set_threads(threads: int) -> None:
    """Run the calling thread's torch and Numba work on ``threads`` threads."""
    import numba

    torch.set_num_threads(threads)
    numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))


def run_rank(spec: RankSpec, path: str, config: EngineConfig, local: tuple | None = None) -> None:
    """A headless rank: build its part of the engine, then run every plan rank 0 sends
    until it sends None. An error ends the process (non-zero), which rank 0 notices."""
    from lmserve.backends.torch.factory import build_runner

    use_threads(spec)
    device = rank_device(config.device, spec.local_rank)
    parallel = join_group(spec, device, None if local is None else SharedMemoryGroup.attach(local))
    runner = build_runner(Path(path), config, parallel, device)
    with torch.inference_mode():
        while (plan := parallel.receive_plan()) is not None:
            runner.execute(move_to(plan, device))
    parallel.leave()


class RankProcesses:
    """The ranks this node spawns (every one of this node's ranks but rank 0)."""

    def __init__(self, specs: list[RankSpec], path: str | Path, config: EngineConfig,
                 local: SharedMemoryGroup | None = None):
        """``local``: rank 0's shared memory, opened by every spawned rank (one machine)."""
        context = multiprocessing.get_context("spawn")
        self.specs = specs
        self.processes = [context.Process(target=run_rank, args=(spec, str(path), config,
                                                                 local and local.for_rank(spec.rank)),
                                          name=f"lmserve-rank-{spec.rank}", daemon=True) for spec in specs]
        self._stopping = threading.Event()
        for process in self.processes:
            process.start()

    @property
    def pids(self) -> list[int]:
        return [process.pid for process in self.processes]

    def exit_within(self, seconds: float) -> str | None:
        """A sentence about a rank that has exited or exits within ``seconds``, if any
        (a failed collective is usually a rank that is going away)."""
        ready = multiprocessing.connection.wait([process.sentinel for process in self.processes], timeout=seconds)
        for process in self.processes:
            if process.sentinel in ready:
                process.join(timeout=1)  # reaped, so its exit code is known
        return self.first_exit()

    def first_exit(self) -> str | None:
        """A sentence about the first rank found exited, if any."""
        for spec, process in zip(self.specs, self.processes):
            if process.exitcode is not None:
                return f"rank {spec.rank} (pid {process.pid}) exited with code {process.exitcode}"
        return None

    def join_group_watching(self, spec: RankSpec, device: torch.device,
                            local: SharedMemoryGroup | None = None) -> TensorParallel:
        """Rank 0 joins the group; a spawned rank that dies first ends the wait with an error."""
        joined: queue.SimpleQueue = queue.SimpleQueue()

        def join() -> None:
            try:
                joined.put(join_group(spec, device, local))
            except BaseException as exc:  # handed to the waiting thread
                joined.put(exc)

        threading.Thread(target=join, name="lmserve-rank-0-join", daemon=True).start()
        while True:
            try:
                result = joined.get(timeout=0.2)
            except queue.Empty:
                exited = self.first_exit()
                if exited is not None:
                    self.stop()
                    raise RuntimeError(f"Tensor parallelism could not start: {exited} (its error is above).")
                continue
            if isinstance(result, BaseException):
                self.stop()
                raise result
            return result

    def watch(self, parallel: TensorParallel) -> None:
        """From now on, a rank that exits before :meth:`stop` fails the group."""

        def wait() -> None:
            exited = self.exit_within(None)
            if not self._stopping.is_set():
                parallel.fail(exited or "a rank exited")

        threading.Thread(target=wait, name="lmserve-rank-watch", daemon=True).start()

    def wait(self) -> int:
        """A headless node: wait for every rank to end; the worst exit code."""
        codes = []
        for process in self.processes:
            process.join()
            codes.append(process.exitcode or 0)
        return max(codes, key=abs, default=0)

    def stop(self, timeout_s: float = STOP_TIMEOUT) -> None:
        """Wait briefly for the ranks to end (they were told to), then end them."""
        self._stopping.set()
        deadline = time.monotonic() + timeout_s
        for process in self.processes:
            process.join(timeout=max(0.0, deadline - time.monotonic()))
            if process.is_alive():  # its sentinel can close a moment before its exit status is known
                process.join(timeout=0.5)
            if process.is_alive():
                logger.warning("Rank process %s did not stop; killing it.", process.pid)
                process.kill()
                process.join()
