"""The one model this server serves: a request's ``model`` must name it."""

from __future__ import annotations

from lmserve.frontends.http.errors import APIError
from lmserve.frontends.http.state import ServerState


def check_model(state: ServerState, model: str) -> None:
    """A 404 unless ``model`` is the served model's name (``--model-name``, or the model's own)."""
    if model != state.model_name:
        raise APIError(404, f"The model '{model}' does not exist.", "model")
