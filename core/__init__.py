"""lmserve's microkernel: hook specs, plugin manager, request bus, types, tokenizer.

Imports neither torch nor sanic, so anything may import it cheaply.
"""

import pluggy

PROJECT_NAME = "lmserve"

hookspec = pluggy.HookspecMarker(PROJECT_NAME)
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)

__all__ = ["PROJECT_NAME", "hookimpl", "hookspec"]
