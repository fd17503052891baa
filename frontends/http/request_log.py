"""The request log: one INFO line as a request enters the bus, one as it leaves.

As LMDeploy's api_server logs them: the prompt's length and the sampling settings,
then how it finished. The prompt itself (the rendered text, chat template markers
included, and its token ids, cut to ``--max-log-len`` characters and ids) is added
only at DEBUG: message text stays out of the logs unless the operator asks for it
(docs/security.md). At the default WARNING nothing is decoded or formatted.

A built-in plugin, as ``/metrics`` is: :hook:`lmserve_register_routes` gives each app its
log (the tokenizer and the cut), and the request hooks find the app of the request being
served.
"""

from __future__ import annotations

import logging

from sanic import Request, Sanic
from sanic.exceptions import SanicException

from lmserve.core import hookimpl
from lmserve.core.types import GenerationOutput, GenerationRequest
from lmserve.frontends.http.http_config import HTTPConfig

logger = logging.getLogger(__name__)


class RequestLog:
    """Writes the request lines of one app.

    :param tokenizer: decodes a prompt's ids into the text logged.
    :param max_log_len: the most characters of a prompt and ids of it printed; None: all.
    """

    def __init__(self, tokenizer, max_log_len: int | None):
        self.tokenizer = tokenizer
        self.max_log_len = max_log_len

    def started(self, request: GenerationRequest) -> None:
        if not logger.isEnabledFor(logging.INFO):
            return
        session = f", session={request.session_key}" if request.session_key is not None else ""
        line = f"request {request.request_id}{session}: input_tokens={len(request.prompt_token_ids)}, " \
               f"sampling={request.sampling_params}"
        if not logger.isEnabledFor(logging.DEBUG):
            logger.info("%s", line)
            return
        ids = request.prompt_token_ids
        prompt = self.tokenizer.decode(ids)
        if self.max_log_len is not None:
            prompt, ids = prompt[:self.max_log_len], ids[:self.max_log_len]
        logger.debug("%s, prompt=%r, prompt_token_ids=%s", line, prompt, list(ids))

    def finished(self, request: GenerationRequest, output: GenerationOutput, elapsed_s: float) -> None:
        if output is None or not logger.isEnabledFor(logging.INFO):
            return
        reason = getattr(output.finish_reason, "value", output.finish_reason)
        error = f", error={output.error}" if output.error else ""
        logger.info("request %s finished: %s, input_tokens=%d, output_tokens=%d, %.3f s%s", request.request_id,
                    reason, output.usage.prompt_tokens, output.usage.completion_tokens, elapsed_s, error)


def _current_log() -> RequestLog | None:
    """The log of the app serving the current request (the bus calls the request hooks
    inside the request's handler, or a task it started)."""
    try:
        request = Request.get_current()
    except SanicException:
        return None
    return getattr(request.app.ctx, "request_log", None)


@hookimpl
def lmserve_register_routes(app: Sanic, state) -> None:
    max_log_len = HTTPConfig.from_options(state.config.options).max_log_len
    app.ctx.request_log = RequestLog(state.tokenizer, max_log_len)


@hookimpl
def lmserve_request_started(request: GenerationRequest) -> None:
    log = _current_log()
    if log is not None:
        log.started(request)


@hookimpl
def lmserve_request_finished(request: GenerationRequest, output: GenerationOutput, elapsed_s: float) -> None:
    log = _current_log()
    if log is not None:
        log.finished(request, output, elapsed_s)
