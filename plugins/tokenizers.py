"""Built-in tokenizer loading: byte-level BPE from GGUF metadata or tokenizer.json."""

from __future__ import annotations

from lmserve.core import hookimpl
from lmserve.core.model_source import ModelSource


@hookimpl(trylast=True)
def lmserve_load_tokenizer(source: ModelSource):
    from lmserve.core.tokenizer import Tokenizer

    return Tokenizer.from_pretrained(source.path)
