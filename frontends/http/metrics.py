"""``GET /metrics``: Prometheus metrics, a built-in plugin.

It uses two hooks, as a third-party plugin would: :hook:`lmserve_register_routes`
gives the app its own registry (several apps may live in one process) and the
route; :hook:`lmserve_request_finished` counts tokens and observes latencies.
The engine's load (running and waiting requests, KV-cache usage, preemptions)
and the HTTP admission queue are read when scraped.

Names follow vLLM's (``vllm:`` becomes ``lmserve:``); every series carries a
``model_name`` label.
"""

from __future__ import annotations

from collections.abc import Iterator

import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import choose_encoder
from sanic import Request, Sanic
from sanic.exceptions import SanicException
from sanic.response import raw

from lmserve.core import hookimpl
from lmserve.core.types import GenerationOutput

# vLLM's buckets, with finer low ones for small models on a CPU.
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
                10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
INTER_TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75,
                       1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
E2E_BUCKETS = (0.01, 0.05, 0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0,
               60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)


class ServerMetrics:
    """One app's registry: the per-request metrics, and the load read at scrape time."""

    def __init__(self, app: Sanic, state):
        self.registry = CollectorRegistry()
        self.model_name = state.model_name
        labels = ["model_name"]
        registry = self.registry
        self.prompt_tokens = Counter(
            "lmserve:prompt_tokens", "Prompt tokens of finished requests.", labels, registry=registry
        ).labels(self.model_name)
        self.generation_tokens = Counter(
            "lmserve:generation_tokens", "Generated tokens of finished requests.", labels, registry=registry
        ).labels(self.model_name)
        self.request_success = Counter(
            "lmserve:request_success", "Finished requests by finish reason (stop, length, abort, error).",
            [*labels, "finished_reason"], registry=registry,
        )
        self.time_to_first_token = Histogram(
            "lmserve:time_to_first_token_seconds", "Seconds from entering the bus to the first token.",
            labels, buckets=TTFT_BUCKETS, registry=registry,
        ).labels(self.model_name)
        self.inter_token_latency = Histogram(
            "lmserve:inter_token_latency_seconds", "Seconds between consecutive outputs of a request.",
            labels, buckets=INTER_TOKEN_BUCKETS, registry=registry,
        ).labels(self.model_name)
        self.e2e_request_latency = Histogram(
            "lmserve:e2e_request_latency_seconds", "Seconds from entering the bus to finishing.",
            labels, buckets=E2E_BUCKETS, registry=registry,
        ).labels(self.model_name)
        registry.register(_LoadCollector(app, state, self.model_name))

    def observe_finished(self, output: GenerationOutput) -> None:
        self.prompt_tokens.inc(output.usage.prompt_tokens)
        self.generation_tokens.inc(output.usage.completion_tokens)
        reason = output.finish_reason.value if output.finish_reason is not None else "abort"
        self.request_success.labels(self.model_name, reason).inc()
        timing = output.timing
        if timing is None:
            return
        if timing.time_to_first_token is not None:
            self.time_to_first_token.observe(timing.time_to_first_token)
        for gap in timing.inter_token:
            self.inter_token_latency.observe(gap)
        self.e2e_request_latency.observe(timing.e2e_latency)

    def render(self, accept: str) -> tuple[bytes, str]:
        encode, content_type = choose_encoder(accept)
        return encode(self.registry), content_type


class _LoadCollector:
    """Gauges read at scrape time: the engine's :class:`~lmserve.core.backend.BackendStats`
    and the HTTP admission queue (``app.ctx.admission``, when set up)."""

    def __init__(self, app: Sanic, state, model_name: str):
        self.app = app
        self.state = state
        self.labels = [model_name]

    def collect(self) -> Iterator[Metric]:
        stats = self.state.bus.backend.stats()
        yield self._gauge("lmserve:num_requests_running", "Sequences the engine is computing.", stats.num_running)
        yield self._gauge("lmserve:num_requests_waiting", "Sequences waiting for room in the engine's batch or "
                          "KV cache.", stats.num_waiting)
        yield self._gauge("lmserve:kv_cache_usage_perc", "Fraction of the KV cache in use (1 = full).",
                          stats.kv_cache_usage)
        yield self._gauge("lmserve:kv_cache_written_bytes", "KV cache memory written at least once since start, "
                          "over all ranks (on the CPU its pages are committed on first write: the cache's "
                          "share of the resident memory).", stats.kv_cache_written_bytes)
        yield self._gauge("lmserve:num_interactive_sessions", "Live interactive sessions (with history or "
                          "a running turn).", len(self.state.bus.sessions))
        yield self._gauge("lmserve:num_sessions_with_kept_kv", "Interactive sessions whose KV cache the engine "
                          "keeps between turns (the others are computed again on their next turn).",
                          stats.num_kept_sessions)
        preemptions = CounterMetricFamily("lmserve:num_preemptions", "Sequences preempted by the engine since "
                                          "start.", labels=["model_name"])
        preemptions.add_metric(self.labels, stats.num_preemptions)
        yield preemptions
        admission = getattr(self.app.ctx, "admission", None)
        if admission is not None:
            yield self._gauge("lmserve:num_http_requests_running", "Generation requests admitted "
                              "(--max-concurrent-requests).", admission.num_running)
            yield self._gauge("lmserve:num_http_requests_waiting", "Generation requests waiting for admission "
                              "(--max-queued-requests).", admission.num_waiting)
            rejected = CounterMetricFamily("lmserve:http_requests_rejected", "Generation requests refused with "
                                           "503 because the admission queue was full.", labels=["model_name"])
            rejected.add_metric(self.labels, admission.num_rejected)
            yield rejected

    def _gauge(self, name: str, documentation: str, value: float) -> GaugeMetricFamily:
        gauge = GaugeMetricFamily(name, documentation, labels=["model_name"])
        gauge.add_metric(self.labels, value)
        return gauge


def _current_metrics() -> ServerMetrics | None:
    """The metrics of the app serving the current request.

    :hook:`lmserve_request_finished` names no app; the bus calls it inside the
    request's handler, or a task that handler started, where Sanic's
    current-request context variable is set.
    """
    try:
        request = Request.get_current()
    except SanicException:  # not inside a request: nobody to count it for
        return None
    return getattr(request.app.ctx, "metrics", None)


@hookimpl
def lmserve_register_routes(app: Sanic, state) -> None:
    prometheus_client.disable_created_metrics()  # no *_created series (as vLLM)
    metrics = ServerMetrics(app, state)
    app.ctx.metrics = metrics

    async def metrics_route(request: Request):
        body, content_type = metrics.render(request.headers.get("accept", ""))
        return raw(body, content_type=content_type)

    app.add_route(metrics_route, "/metrics", methods=["GET"], name="metrics")


@hookimpl
def lmserve_request_finished(request, output: GenerationOutput, elapsed_s: float) -> None:
    metrics = _current_metrics()
    if metrics is not None:
        metrics.observe_finished(output)
