"""A plugin that withholds the grammar engine: its wrapper answers
``lmserve_grammar_compiler`` with None whatever the built-in offers, so the server
runs as one without llguidance would (tests/frontends/test_no_grammar_engine.py
loads it with ``--plugin``)."""

from lmserve.core import hookimpl


@hookimpl(wrapper=True)
def lmserve_grammar_compiler(tokenizer):
    yield  # the built-in's compiler, dropped
    return None
