"""The tiny byte-level BPE tokenizer of the tests: it ships with lmserve (for
plugin authors' tests too) in :mod:`lmserve.plugins.tiny_model`."""

from lmserve.plugins.tiny_model import (  # noqa: F401  (re-exported for the tests)
    CHATML_TEMPLATE,
    NUM_MERGES,
    SPECIAL_TOKENS,
    VOCAB_SIZE,
    learn_merges,
    tokenizer_config,
    tokenizer_json,
    write_tiny_tokenizer,
)
