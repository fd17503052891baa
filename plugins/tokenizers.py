"""Built-in tokenizer loading: byte-level BPE from GGUF metadata or tokenizer.json.

The loaders are in ``lmserve.plugins.tokenizer_files``, imported on the first
call so that loading the plugins stays cheap.
"""

from __future__ import annotations

from lmserve.core import hookimpl
from lmserve.core.model_source import ModelSource


@hookimpl(trylast=True)
def lmserve_load_tokenizer(source: ModelSource):
    from lmserve.plugins.tokenizer_files import tokenizer_from_path

    return tokenizer_from_path(source.path)
