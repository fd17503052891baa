"""Hook implementations that make the torch engine lmserve's built-in backend."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading

from lmserve.backends.torch.engine_config import EngineConfig
from lmserve.core import hookimpl
from lmserve.core.config import MODEL_COMMANDS, QUANTIZATION_CHOICES, ServeConfig
from lmserve.core.model_source import ModelSource
from lmserve.core.progress import ProgressBar

logger = logging.getLogger(__name__)

#: After a fatal engine error, the seconds the server waits for the failed streams to
#: reach their clients before it stops (and exits 1).
FATAL_GRACE_S = 1.0

@hookimpl
def lmserve_add_cli_options(command, parser):
    if command not in MODEL_COMMANDS:
        return
    group = parser.add_argument_group("torch engine")
    group.add_argument("--cache-max-entry-count", type=float, default=EngineConfig.cache_max_entry_count,
                       help="KV-cache size: a fraction (0, 1) of the device memory free after the weights "
                       "load (on the CPU: of the available RAM), or an integer >= 1: a number of blocks.")
    group.add_argument("--cache-block-seq-len", type=int, default=EngineConfig.cache_block_seq_len,
                       help="Tokens per KV-cache block.")
    group.add_argument("--max-batch-size", type=int, default=EngineConfig.max_batch_size,
                       help="Most sequences in one step.")
    group.add_argument("--max-prefill-token-num", type=int, default=EngineConfig.max_prefill_token_num,
                       help="Most prompt tokens computed in one step (longer prompts are prefilled in chunks).")
    group.add_argument("--enable-prefix-caching", action="store_true", default=EngineConfig.enable_prefix_caching,
                       help="Reuse the KV cache of full blocks shared by prompts (hits are reported as "
                       "usage.prompt_tokens_details.cached_tokens).")
    group.add_argument("--quantization", default=EngineConfig.quantization, choices=QUANTIZATION_CHOICES,
                       help="Weight-only quantization of the linear layers (CPU): int8 (one scale per row), "
                       "int4 (groups of 32, GGUF Q4_1's layout; lm_head stays int8), none, or auto: a quantized "
                       "GGUF file keeps its precision (Q4_x: int4, Q5_x-Q8_0: int8), anything else none.")
    group.add_argument("--enforce-eager", "--eager-mode", action=argparse.BooleanOptionalAction,
                       default=EngineConfig.enforce_eager,
                       help="Run every step op by op instead of compiling the decode step (CPU; "
                       "compiling takes about a minute at start-up, cached on disk for the next start). "
                       "--eager-mode is LMDeploy's name.")
    group.add_argument("--batch-invariant", action="store_true", default=EngineConfig.batch_invariant,
                       help="A request's tokens do not depend on the other requests in the batch or its place "
                       "among them (greedy and seeded): quantized layers multiply every step with their dense copy, "
                       "prompts are chunked at fixed positions, mixed steps run their decodes apart. Costs "
                       "throughput (docs/performance.md).")
    group.add_argument("--cpu-threads", type=int, default=EngineConfig.cpu_threads, metavar="N",
                       help="torch and Numba threads per rank on the CPU (default: the machine's cores shared "
                       "by its ranks).")
    parallel = parser.add_argument_group("tensor parallelism")
    parallel.add_argument("--tp", type=int, default=EngineConfig.tensor_parallel_size, metavar="N",
                          help="Split the model over N ranks (processes; one GPU each on CUDA, cores // N threads "
                          "each on the CPU). N must divide the attention heads and divide, or be a multiple of, "
                          "the key/value heads.")
    parallel.add_argument("--tp-timeout", type=float, default=EngineConfig.tp_timeout, metavar="SECONDS",
                          help="How long a rank waits for the others in a collective before the server gives up "
                          "on them (fails the requests in flight and exits 1).")
    parallel.add_argument("--nnodes", type=int, default=EngineConfig.nnodes, metavar="N",
                          help="Machines the --tp ranks run on (equally many each); node 0 serves HTTP.")
    parallel.add_argument("--node-rank", type=int, default=EngineConfig.node_rank, metavar="K",
                          help="This machine's index among --nnodes; nodes 1.. run their ranks headless.")
    parallel.add_argument("--master-addr", default=EngineConfig.master_addr, metavar="HOST",
                          help="Node 0's address, where the ranks meet (every node names the same).")
    parallel.add_argument("--master-port", type=int, default=EngineConfig.master_port, metavar="PORT",
                          help="The port the ranks meet on at --master-addr (default on one node: a free one).")


@hookimpl(trylast=True)
def lmserve_model_families():
    """The built-in families, after any a plugin contributes."""
    from lmserve.backends.torch.models.family import builtin_families

    return builtin_families()


@hookimpl(trylast=True)
def lmserve_make_backend(config: ServeConfig, source: ModelSource, model_families):
    # torch is imported here, not at module level: `lmserve plugins` stays fast.
    from lmserve.backends.torch.factory import create_backend

    engine_config = EngineConfig.from_options(config, model_families)
    if engine_config.node_rank > 0:
        raise SystemExit(_serve_headless_node(source, engine_config))
    backend = create_backend(source.path, engine_config, progress=ProgressBar("Loading weights"),
                             on_fatal=_stop_server, announce=_announce)
    print(f"lmserve: {backend.describe()}", file=sys.stderr)
    return backend


def _announce(line: str) -> None:
    """A start-up stage on stderr, as the weight loading's progress: the warm-up says what it
    compiles before it starts and how long it took."""
    print(f"lmserve: {line}", file=sys.stderr, flush=True)


def _serve_headless_node(source: ModelSource, config) -> int:
    """``--node-rank 1..``: run this node's ranks for node 0's server; exit with them."""
    from lmserve.backends.torch.factory import run_headless_node

    print(f"lmserve: node {config.node_rank} of {config.nnodes}: running its ranks of --tp "
          f"{config.tensor_parallel_size} for the server on node 0 ({config.master_addr}:{config.master_port})",
          file=sys.stderr)
    return run_headless_node(source.path, config)


def _stop_server(message: str) -> None:
    """The engine can no longer step: stop the server (it then exits 1) once the failed
    streams have had a moment to reach their clients."""
    print(f"lmserve: error: {message}; the server stops.", file=sys.stderr)
    threading.Timer(FATAL_GRACE_S, os.kill, (os.getpid(), signal.SIGTERM)).start()
