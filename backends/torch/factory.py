"""Build the torch backend: load weights, size the KV cache, assemble the engine, warm up."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from lmserve.backends.torch.attention import layer_attention
from lmserve.backends.torch.backend import TorchBackend
from lmserve.backends.torch.block_manager import BlockManager
from lmserve.backends.torch.compiled_step import CompiledDecodeStep
from lmserve.backends.torch.decode_graphs import DecodeGraphs
from lmserve.backends.torch.device import choose_dtype, resolve_device
from lmserve.backends.torch.engine import LLMEngine
from lmserve.backends.torch.engine_config import EngineConfig  # noqa: F401  (callers import it from here)
from lmserve.backends.torch.kernels import warm_up as warm_up_kernels
from lmserve.backends.torch.models.causal_lm import CausalLM
from lmserve.backends.torch.model_config import ModelConfig
from lmserve.backends.torch.model_runner import ModelRunner
from lmserve.backends.torch.packed_linear import pack_linear_layers
from lmserve.backends.torch.paged_cache import PagedKVCache
from lmserve.backends.torch.primitive_caches import drop_duplicate_cache
from lmserve.backends.torch.quantization_choice import choose_quantization
from lmserve.backends.torch.quantized_linear import quantize_linear_layers, use_one_matmul
from lmserve.backends.torch.ranks import RankProcesses, node_ranks, rank_device, set_threads, use_threads
from lmserve.backends.torch.sampler import Sampler
from lmserve.backends.torch.scheduler import Scheduler
from lmserve.backends.torch.shared_memory_group import SharedMemoryGroup
from lmserve.backends.torch.models.family import family_for_architecture
from lmserve.backends.torch.tensor_parallel import SINGLE, TensorParallel
from lmserve.backends.torch.weights import load_model, read_model_config
from lmserve.core.config import QUANTIZATIONS
from lmserve.core.types import EngineRequest, SamplingParams


#: With ``--batch-invariant``, quantized layers multiply every row count with their dense
#: copy (True) or with the weight-only kernel (False). Measured (docs/performance.md, "Batch
#: invariance"): the copy costs one stream 31% and 64 streams nothing; the kernel costs
#: one stream 8% and 64 streams 38%. Users who ask for invariance run batches (evals, RL).
INVARIANT_QUANTIZED_DENSE = True


def available_memory(device: torch.device) -> int:
    """Bytes free on ``device`` now: free GPU memory, or the RAM available to new allocations."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def create_backend(path: str | Path, config: EngineConfig,
                   progress: Callable[[int, int], None] | None = None,
                   on_fatal: Callable[[str], None] | None = None,
                   announce: Callable[[str], None] | None = None) -> TorchBackend:
    """Load the model and build the engine (in the backend's own thread, see
    :mod:`~lmserve.backends.torch.backend`), warmed up and ready to start.
    ``on_fatal(message)``: called if the engine can no longer step (a rank died).
    ``announce(line)``: told what the warm-up does before it starts and how long it took
    (:func:`warm_up`); None: silent."""
    return TorchBackend(lambda: build_engine(path, config, progress, announce), on_fatal)


@dataclass(frozen=True)
class LoadedModel:
    config: ModelConfig
    model: CausalLM
    device: torch.device
    dtype: torch.dtype
    #: What the weights are and why, for the start-up line.
    weights: str


def load_engine_model(path: str | Path, config: EngineConfig,
                      progress: Callable[[int, int], None] | None = None,
                      parallel: TensorParallel = SINGLE, device: torch.device | None = None) -> LoadedModel:
    """The model as the engine runs it (this rank's part of it under tensor parallelism):
    loaded in the chosen dtype, projections fused, quantized if asked (or if ``auto``
    finds a quantized GGUF), and on the CPU packed for oneDNN."""
    drop_duplicate_cache()  # before the first matmul
    device = device or resolve_device(config.device)
    if config.quantization in QUANTIZATIONS and device.type != "cpu":
        raise ValueError(f"--quantization {config.quantization} runs on the CPU only for now.")
    dtype, dtype_reason = choose_dtype(config.dtype, device)
    quantization, quantization_reason = choose_quantization(config.quantization, path, device)
    # Quantized layers start from float32 weights: a dequantized Q4_1 tensor is exact
    # there, so its 4-bit codes come back as they were in the file.
    load_dtype = dtype if quantization is None else torch.float32
    model_config, model = load_model(path, device=device, dtype=load_dtype, progress=progress, parallel=parallel,
                                     families=config.model_families)
    model.fuse_projections()
    dtype_name = str(dtype).removeprefix("torch.")
    weights = f"{dtype_name} ({dtype_reason})"
    if quantization is not None:
        quantize_linear_layers(model, quantization, dtype)
        if config.batch_invariant:
            use_one_matmul(model, dense=INVARIANT_QUANTIZED_DENSE)
        for parameter in model.parameters():  # what stays unquantized: embeddings, norms
            parameter.data = parameter.data.to(dtype)
        weights = (f"{quantization} weights ({quantization_reason}), {dtype_name} activations and KV cache "
                   f"({dtype_reason})")
    if device.type == "cpu":
        pack_linear_layers(model)
    return LoadedModel(model_config, model, device, dtype, weights)


def build_runner(path: str | Path, config: EngineConfig, parallel: TensorParallel = SINGLE,
                 device: torch.device | None = None,
                 progress: Callable[[int, int], None] | None = None) -> ModelRunner:
    """This rank's model and KV cache, ready to run steps. The cache has as many blocks
    as fit on every rank (block ids are the same on all of them)."""
    loaded = load_engine_model(path, config, progress, parallel, device)
    model_config, model, device, dtype = loaded.config, loaded.model, loaded.device, loaded.dtype
    _, num_kv_heads = parallel.kv_heads(model_config.num_key_value_heads)
    block_size = config.cache_block_seq_len
    if config.cache_max_entry_count >= 1:
        num_blocks = int(config.cache_max_entry_count)
    else:
        per_block = PagedKVCache.bytes_per_block(model_config, block_size, dtype) * num_kv_heads \
            // model_config.num_key_value_heads
        # The ranks of one machine share its memory; a GPU is its rank's own.
        sharing = 1 if device.type == "cuda" else config.tensor_parallel_size // config.nnodes
        num_blocks = int(available_memory(device) * config.cache_max_entry_count / sharing) // per_block
    num_blocks = parallel.agree_min(num_blocks)
    if num_blocks < 1:
        raise ValueError("No memory is left for the KV cache; raise --cache-max-entry-count or free memory.")
    kv_cache = PagedKVCache(model_config.num_hidden_layers, num_blocks, block_size, num_kv_heads,
                            model_config.head_dim, dtype, device, layer_attention(model_config))
    weights = loaded.weights + (f", tensor parallel over {parallel.world_size} ranks" if parallel.is_parallel else "")
    graphs = None
    if device.type == "cuda" and not config.enforce_eager and not parallel.is_parallel:
        max_blocks = min(-(-max_model_len(config, model_config) // block_size), num_blocks)
        graphs = DecodeGraphs(model, kv_cache, device, max_batch_size=config.max_batch_size, max_blocks=max_blocks,
                              step=CompiledDecodeStep(model))
    return ModelRunner(model, kv_cache, device, weights=weights, compile_decodes=not config.enforce_eager, parallel=parallel,
                       decode_graphs=graphs, batch_invariant=config.batch_invariant)


def max_model_len(config: EngineConfig, model_config: ModelConfig) -> int:
    """The longest sequence (prompt and output) the engine serves: ``--session-len`` or the model's."""
    return config.session_len or model_config.max_position_embeddings


def check_parallel(path: str | Path, config: EngineConfig) -> None:
    """Refuse a ``--tp`` the model's family cannot split, before any weight loads."""
    model_config = read_model_config(path, config.model_families)
    family_for_architecture(model_config.architecture, config.model_families).check_parallel(
        model_config, config.tensor_parallel_size)


def start_tensor_parallel(path: str | Path, config: EngineConfig) -> tuple[TensorParallel, RankProcesses, torch.device]:
    """Node 0's side: check the split, spawn this node's other ranks, join the group as rank 0."""
    check_parallel(path, config)
    first, *others = node_ranks(config)
    use_threads(first)
    device = rank_device(config.device, first.local_rank)
    local = None
    if config.nnodes == 1 and device.type == "cpu":
        local = SharedMemoryGroup.create(config.tensor_parallel_size, config.tp_timeout)
    processes = RankProcesses(others, path, config, local)
    parallel = processes.join_group_watching(first, device, local)
    processes.watch(parallel)
    return parallel, processes, device


def run_headless_node(path: str | Path, config: EngineConfig) -> int:
    """A node other than node 0: run its ranks (no engine, no HTTP) until they end;
    the worst exit code."""
    check_parallel(path, config)
    return RankProcesses(node_ranks(config), path, config).wait()


def build_engine(path: str | Path, config: EngineConfig,
                 progress: Callable[[int, int], None] | None = None,
                 announce: Callable[[str], None] | None = None) -> LLMEngine:
    if config.tensor_parallel_size > 1:
        parallel, processes, device = start_tensor_parallel(path, config)
        try:
            runner = build_runner(path, config, parallel, device, progress)
        except BaseException:
            processes.stop()
            raise
        runner.ranks = processes
    else:
        if config.cpu_threads is not None:
            set_threads(config.cpu_threads)
        runner = build_runner(path, config, progress=progress)
    model_config, num_blocks = runner.model.config, runner.kv_cache.num_blocks
    block_size = config.cache_block_seq_len
    scheduler = Scheduler(
        BlockManager(num_blocks, block_size, config.enable_prefix_caching),
        max_batch_size=config.max_batch_size,
        max_prefill_token_num=config.max_prefill_token_num,
        batch_invariant=config.batch_invariant,
    )
    engine = LLMEngine(runner, scheduler, Sampler(), eos_token_ids=model_config.eos_token_ids,
                       max_model_len=max_model_len(config, model_config))
    warm_up(engine, announce)
    return engine


def warm_up(engine: LLMEngine, announce: Callable[[str], None] | None = None) -> None:
    """Compile the kernels, capture the decode graphs (CUDA), then run a prefill, a batched
    decode, a one-sequence decode and sampling once, so the first request pays no
    first-call costs (the compiled decode step has a graph for each kind of decode).

    ``announce(line)`` is told what the warm-up does before it starts and how long it
    took once done (:func:`warm_up_lines`): a first start compiles for a minute or two."""
    if announce is not None:
        announce(warm_up_lines(engine.runner)[0])
    start = time.perf_counter()
    _warm_up(engine)
    if announce is not None:  # asked again: a compile that failed leaves the steps eager
        announce(warm_up_lines(engine.runner)[1].format(seconds=time.perf_counter() - start))


def warm_up_lines(runner: ModelRunner) -> tuple[str, str]:
    """What the warm-up of ``runner``'s engine is about to do, and what it did (with a
    ``{seconds}`` field): compile the decode step (on the CPU without ``--enforce-eager``,
    one rank) and capture its CUDA graphs (CUDA), or only warm up."""
    cache_note = "later starts reuse the on-disk cache"
    graphs = runner.decode_graphs
    if graphs is not None and isinstance(graphs.step, CompiledDecodeStep):
        return (f"compiling the decode step and capturing its CUDA graphs (the first start takes longest; "
                f"{cache_note})...", "decode step compiled and CUDA graphs captured in {seconds:.1f} s")
    if graphs is not None:
        return "capturing the decode steps' CUDA graphs...", "CUDA graphs captured in {seconds:.1f} s"
    if runner.decode_step is not None:
        return (f"compiling the decode step (first start: 1-2 min on a small CPU; {cache_note})...",
                "decode step compiled in {seconds:.1f} s")
    return "warming up...", "warmed up in {seconds:.1f} s"


def _warm_up(engine: LLMEngine) -> None:
    warm_up_kernels(use_cuda=engine.runner.device.type == "cuda")
    with torch.inference_mode():
        engine.runner.capture_decode_graphs()
    greedy = SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True)
    sampled = SamplingParams(max_tokens=2, temperature=1.0, top_p=0.9, top_k=5, seed=0, ignore_eos=True)
    longer = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
    with torch.inference_mode():
        engine.add_request(EngineRequest("warm-up-0", (0, 1, 2), greedy))
        engine.add_request(EngineRequest("warm-up-1", (3, 4), sampled))
        engine.add_request(EngineRequest("warm-up-2", (5, 6), longer))
        while engine.has_work:
            engine.step()
