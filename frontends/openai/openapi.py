"""OpenAPI document and Swagger UI for the HTTP API (in progress)."""

from __future__ import annotations

from sanic import Sanic


def setup_openapi(app: Sanic, disable_docs: bool = False) -> None:
    """Describe the registered routes in ``/openapi.json`` and serve Swagger UI at ``/``."""
