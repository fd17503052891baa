"""Hook implementations that make the torch engine lmserve's built-in backend."""

from __future__ import annotations

import argparse
import logging
import sys

from lmserve.core import hookimpl
from lmserve.core.config import QUANTIZATION_CHOICES, SERVE_API_SERVER, ServeConfig
from lmserve.core.model_source import ModelSource
from lmserve.core.progress import ProgressBar

logger = logging.getLogger(__name__)

@hookimpl
def lmserve_add_cli_options(command, parser):
    if command != SERVE_API_SERVER:
        return
    group = parser.add_argument_group("torch engine")
    group.add_argument("--cache-max-entry-count", type=float, default=0.8,
                       help="KV-cache size: a fraction (0, 1) of the device memory free after the weights "
                       "load (on the CPU: of the available RAM), or an integer >= 1: a number of blocks.")
    group.add_argument("--cache-block-seq-len", type=int, default=64, help="Tokens per KV-cache block.")
    group.add_argument("--max-batch-size", type=int, default=128, help="Most sequences in one step.")
    group.add_argument("--max-prefill-token-num", type=int, default=4096,
                       help="Most prompt tokens computed in one step (longer prompts are prefilled in chunks).")
    group.add_argument("--enable-prefix-caching", action="store_true",
                       help="Reuse the KV cache of full blocks shared by prompts (hits are reported as "
                       "usage.prompt_tokens_details.cached_tokens).")
    group.add_argument("--quantization", default="auto", choices=QUANTIZATION_CHOICES,
                       help="Weight-only quantization of the linear layers (CPU): int8 (one scale per row), "
                       "int4 (groups of 32, GGUF Q4_1's layout; lm_head stays int8), none, or auto: a quantized "
                       "GGUF file keeps its precision (Q4_x: int4, Q5_x-Q8_0: int8), anything else none.")
    group.add_argument("--enforce-eager", action=argparse.BooleanOptionalAction, default=False,
                       help="Run every step op by op instead of compiling the decode step (CPU; "
                       "compiling takes about a minute at start-up, cached on disk for the next start).")


@hookimpl(trylast=True)
def lmserve_make_backend(config: ServeConfig, source: ModelSource):
    # torch is imported here, not at module level: `lmserve plugins` stays fast.
    from lmserve.backends.torch.factory import EngineConfig, create_backend

    options = config.options
    engine_config = EngineConfig(
        device=config.device,
        dtype=config.dtype,
        session_len=config.session_len,
        cache_max_entry_count=options.get("cache_max_entry_count", 0.8),
        cache_block_seq_len=options.get("cache_block_seq_len", 64),
        max_batch_size=options.get("max_batch_size", 128),
        max_prefill_token_num=options.get("max_prefill_token_num", 4096),
        enable_prefix_caching=options.get("enable_prefix_caching", False),
        quantization=options.get("quantization", "auto"),
        enforce_eager=options.get("enforce_eager", False),
    )
    backend = create_backend(source.path, engine_config, progress=ProgressBar("Loading weights"))
    print(f"lmserve: {backend.describe()}", file=sys.stderr)
    return backend
