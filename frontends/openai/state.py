"""What the HTTP routes share: built once at startup, read-only afterwards."""

from __future__ import annotations

from dataclasses import dataclass

from lmserve.core.bus import RequestBus
from lmserve.core.chat_template import ChatTemplate
from lmserve.core.config import ServeConfig


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

    @property
    def max_model_len(self) -> int:
        return self.bus.backend.max_model_len
