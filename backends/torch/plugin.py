"""Hook implementations that make the torch engine lmserve's built-in backend."""

from __future__ import annotations

import logging

from lmserve.core import hookimpl
from lmserve.core.config import ServeConfig
from lmserve.core.model_source import ModelSource
from lmserve.core.progress import ProgressBar

logger = logging.getLogger(__name__)


@hookimpl(trylast=True)
def lmserve_make_backend(config: ServeConfig, source: ModelSource):
    # torch is imported here, not at module level: `lmserve plugins` stays fast.
    from lmserve.backends.torch.backend import TorchBackend
    from lmserve.backends.torch.device import resolve_device, resolve_dtype
    from lmserve.backends.torch.kv_cache import KVCache
    from lmserve.backends.torch.weights import load_model

    device = resolve_device(config.device)
    dtype = resolve_dtype(config.dtype, device)
    model_config, model = load_model(
        source.path, device=device, dtype=dtype, progress=ProgressBar("Loading weights")
    )
    max_model_len = config.session_len or model_config.max_position_embeddings
    kv_cache = KVCache.allocate(model_config, max_model_len, dtype=dtype, device=device)
    backend = TorchBackend(
        model,
        kv_cache,
        max_model_len=max_model_len,
        eos_token_ids=model_config.eos_token_ids,
        device=device,
        max_prefill_token_num=int(config.options.get("max_prefill_token_num") or 1024),
    )
    backend.warm_up()
    logger.info("torch backend ready on %s (%s), context %d tokens", device, dtype, max_model_len)
    return backend
