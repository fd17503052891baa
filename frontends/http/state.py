"""What the HTTP routes share: built once at startup, read-only afterwards."""

from __future__ import annotations

from dataclasses import dataclass

from lmserve.core.bus import RequestBus
from lmserve.core.chat_template import ChatTemplate
from lmserve.core.config import ServeConfig
from lmserve.core.reasoning import ReasoningParser
from lmserve.core.sampling_defaults import SamplingDefaults
from lmserve.core.structured_output import GrammarCompiler
from lmserve.core.tool_calls import ToolParser


@dataclass(frozen=True)
class ServerState:
    config: ServeConfig
    model_name: str
    bus: RequestBus
    tokenizer: object
    chat_template: ChatTemplate
    #: Template stop words that are single tokens; every request stops on them.
    default_stop_token_ids: tuple[int, ...] = ()
    #: Template stop words of several tokens; every chat request stops on them as on its ``stop``.
    default_stop_strings: tuple[str, ...] = ()
    #: Compiles response formats over this tokenizer (cached per format), from the
    #: :hook:`lmserve_grammar_compiler` hook; None where no plugin offers a grammar engine.
    grammars: GrammarCompiler | None = None
    #: Reads tool calls out of ``tool_choice: auto`` outputs (``--tool-call-parser``).
    tool_parser: type[ToolParser] | None = None
    #: Reads the constrained output of ``tool_choice: required``.
    json_tool_parser: type[ToolParser] | None = None
    #: Splits chat outputs' reasoning from their content (``--reasoning-parser``); None: no split.
    reasoning_parser: type[ReasoningParser] | None = None
    #: Its tags are special tokens of this tokenizer: chat outputs are decoded with them
    #: (:meth:`ReasoningParser.keeps_special_tokens`, asked once at startup).
    reasoning_keeps_special_tokens: bool = False
    #: What chat and completions requests that leave a sampling field unset get (``--generation-config``).
    sampling_defaults: SamplingDefaults = SamplingDefaults()

    @property
    def max_model_len(self) -> int:
        """The context length, for what routes report (``/v1/models``, ``/tokenize``); a rule that
        needs it (the context room) is the bus's to apply: ask ``bus.check_length``."""
        return self.bus.backend.max_model_len
