"""Configuration: one frozen dataclass, validated on construction."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Mapping

LOG_LEVELS = ("CRITICAL", "ERROR", "WARNING", "INFO", "DEBUG")
DEVICES = ("auto", "cpu", "cuda")
DTYPES = ("auto", "float32", "float16", "bfloat16")
#: The torch engine's weight-only ``--quantization`` methods.
QUANTIZATIONS = ("int8", "int4")
#: What ``--quantization`` takes: a method, ``none`` (the dtype's weights), or ``auto``
#: (the method that keeps a quantized GGUF file's precision, on the CPU).
QUANTIZATION_CHOICES = ("auto", "none", *QUANTIZATIONS)

#: The ``command`` that :hook:`lmserve_add_cli_options` gets for the API server's parser.
SERVE_API_SERVER = "serve api_server"
#: The ``command`` for ``lmserve serve ray``'s parser: the api_server's options, and
#: its engines as replicas on Ray Serve.
SERVE_RAY = "serve ray"
#: The ``command`` for ``lmserve chat``'s parser (a model loaded in the process, no server).
CHAT = "chat"
#: The commands that load a model: a backend plugin adds its engine's options to these.
MODEL_COMMANDS = (SERVE_API_SERVER, SERVE_RAY, CHAT)


@dataclass(frozen=True)
class ServeConfig:
    """What ``lmserve serve api_server`` was asked to do.

    ``options`` holds every parsed command-line option by its dest name,
    plugin-added ones included, so plugins can read their own flags.
    """

    model: str
    model_name: str | None = None
    server_name: str = "0.0.0.0"
    server_port: int = 23333
    session_len: int | None = None  # None: the model's context length
    log_level: str = "WARNING"
    device: str = "auto"
    dtype: str = "auto"
    #: Idle interactive sessions are ended after this many seconds; 0: never.
    session_ttl: float = 1800.0
    #: A template name, a JSON file or a JSON string (LMDeploy's fields); None: choose by the model.
    chat_template: str | None = None
    #: The default system prompt, for conversations that bring none; None: the template's own.
    meta_instruction: str | None = None
    #: The tool-call parser's name or alias; None: the one that fits the chat template.
    tool_call_parser: str | None = None
    plugins: tuple[str, ...] = ()
    options: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.model:
            raise ValueError("MODEL must not be empty.")
        if not (0 <= self.server_port <= 65535):
            raise ValueError(f"--server-port must be in [0, 65535], got {self.server_port}.")
        if self.session_len is not None and self.session_len < 2:
            raise ValueError(f"--session-len must be at least 2, got {self.session_len}.")
        level = self.log_level.upper()
        if level not in LOG_LEVELS:
            raise ValueError(f"--log-level must be one of {', '.join(LOG_LEVELS)}, got {self.log_level!r}.")
        object.__setattr__(self, "log_level", level)
        if self.device not in DEVICES and not self.device.startswith("cuda:"):
            raise ValueError(f"--device must be one of {', '.join(DEVICES)} or cuda:N, got {self.device!r}.")
        if self.dtype not in DTYPES:
            raise ValueError(f"--dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}.")
        if not self.session_ttl >= 0:  # NaN fails too
            raise ValueError(f"--session-ttl must be >= 0 (0: never), got {self.session_ttl}.")
        if self.chat_template is not None and not self.chat_template.strip():
            raise ValueError("--chat-template must not be empty.")
        object.__setattr__(self, "plugins", tuple(self.plugins))
        object.__setattr__(self, "options", MappingProxyType(dict(self.options)))


def settings_from_options(cls: type, options: Mapping[str, Any], option_names: Mapping[str, str] = MappingProxyType({}),
                          **given: Any) -> Any:
    """The settings dataclass ``cls`` from parsed flags (``options``, by dest name; a
    field's flag is ``option_names.get(field, field)``): a flag absent or None leaves the
    field's default, so the dataclass is the one place its defaults are written.
    ``given``: fields set otherwise, which the options do not override."""
    values = dict(given)
    for setting in dataclasses.fields(cls):
        value = options.get(option_names.get(setting.name, setting.name))
        if setting.name not in values and value is not None:
            values[setting.name] = value
    return cls(**values)
