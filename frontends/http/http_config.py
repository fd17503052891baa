"""The HTTP server's operational settings: API keys, limits, CORS, docs, shutdown, request log.

One frozen dataclass, validated on construction like
:class:`~lmserve.core.config.ServeConfig`; the CLI reads its defaults from here,
and :func:`HTTPConfig.from_options` builds it from ``config.options``. No sanic
import: the CLI imports this module before it knows whether it will serve.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from lmserve.core.config import settings_from_options

MiB = 1 << 20


@dataclass(frozen=True)
class HTTPConfig:
    #: Keys accepted as ``Authorization: Bearer <key>``; empty: no authentication.
    api_keys: tuple[str, ...] = ()
    #: Generation requests computed at once; None: unlimited.
    max_concurrent_requests: int | None = None
    #: Generation requests waiting for one of those slots; None: as many as
    #: ``max_concurrent_requests``.
    max_queued_requests: int | None = None
    #: The largest request body accepted, in bytes.
    max_request_bytes: int = 10 * MiB
    #: Origins answered with CORS headers ("*": any); empty: no CORS headers.
    allow_origins: tuple[str, ...] = ()
    allow_methods: tuple[str, ...] = ("*",)
    allow_headers: tuple[str, ...] = ("*",)
    allow_credentials: bool = False
    #: No Swagger UI and no /openapi.json.
    disable_docs: bool = False
    #: The Swagger UI page loads its files from a public CDN instead of this server.
    swagger_ui_cdn: bool = False
    #: Seconds in-flight requests may run on after SIGTERM before they are aborted.
    shutdown_timeout: float = 30.0
    #: Live interactive sessions one client may hold (a client: its API key, or its address
    #: without keys); 0: unlimited.
    max_sessions_per_client: int = 256
    #: Tokens of history (kept KV) one client's live sessions may hold together; 0: unlimited.
    max_session_tokens_per_client: int = 0
    #: Seconds a client may take to send a request's headers, and the most seconds between
    #: two pieces of its body; a slower connection is closed.
    request_timeout: float = 30.0
    #: Seconds a response may take, from its request to its last byte (a stream included);
    #: past it the request is aborted (a stream ends with an error event). 0: no limit.
    response_timeout: float = 0.0
    #: The request log (INFO) prints at most this many characters of a prompt and as many of
    #: its token ids; None: all.
    max_log_len: int | None = None

    def __post_init__(self) -> None:
        keys = tuple(self.api_keys)
        for key in keys:
            if not key or any(char.isspace() for char in key):
                raise ValueError("--api-keys: a key must be non-empty and contain no whitespace.")
        object.__setattr__(self, "api_keys", keys)
        if self.max_concurrent_requests is not None and self.max_concurrent_requests < 1:
            raise ValueError(f"--max-concurrent-requests must be at least 1, got {self.max_concurrent_requests}.")
        if self.max_queued_requests is not None and self.max_queued_requests < 0:
            raise ValueError(f"--max-queued-requests must be at least 0, got {self.max_queued_requests}.")
        if self.max_queued_requests is not None and self.max_concurrent_requests is None:
            raise ValueError("--max-queued-requests needs --max-concurrent-requests (without it nothing waits).")
        if self.max_queued_requests is None and self.max_concurrent_requests is not None:
            object.__setattr__(self, "max_queued_requests", self.max_concurrent_requests)
        if self.max_request_bytes < 1:
            raise ValueError(f"--max-request-bytes must be at least 1, got {self.max_request_bytes}.")
        origins = tuple(origin.rstrip("/") if origin != "*" else origin for origin in self.allow_origins)
        for origin in origins:
            if origin != "*" and "://" not in origin:
                raise ValueError(f"--allow-origins: {origin!r} is not '*' or an origin like https://example.com.")
        object.__setattr__(self, "allow_origins", origins)
        object.__setattr__(self, "allow_methods", tuple(method.upper() for method in self.allow_methods))
        object.__setattr__(self, "allow_headers", tuple(header.lower() for header in self.allow_headers))
        if not self.shutdown_timeout >= 0:  # also refuses NaN
            raise ValueError(f"--shutdown-timeout must be at least 0 seconds, got {self.shutdown_timeout}.")
        if self.max_sessions_per_client < 0:
            raise ValueError(f"--max-sessions-per-client must be at least 0 (0: unlimited), "
                             f"got {self.max_sessions_per_client}.")
        if self.max_session_tokens_per_client < 0:
            raise ValueError(f"--max-session-tokens-per-client must be at least 0 (0: unlimited), "
                             f"got {self.max_session_tokens_per_client}.")
        if not self.request_timeout > 0:
            raise ValueError(f"--request-timeout must be more than 0 seconds, got {self.request_timeout}.")
        if not self.response_timeout >= 0:
            raise ValueError(f"--response-timeout must be at least 0 seconds (0: no limit), "
                             f"got {self.response_timeout}.")
        if self.max_log_len is not None and self.max_log_len < 0:
            raise ValueError(f"--max-log-len must be at least 0, got {self.max_log_len}.")

    @classmethod
    def from_options(cls, options: Mapping[str, Any]) -> HTTPConfig:
        """The settings among ``options`` (parsed flags by dest name); absent or None: the default."""
        return settings_from_options(cls, options)
