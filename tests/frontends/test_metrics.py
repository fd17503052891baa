"""GET /metrics: Prometheus text, vLLM's names, per-request metrics from the finished hook."""

from types import SimpleNamespace

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from lmserve.core.backend import BackendStats
from lmserve.core.types import FinishReason, GenerationOutput, RequestTiming, TokenUsage
from lmserve.frontends.http import metrics as metrics_plugin
from lmserve.frontends.http.limits import AdmissionQueue
from lmserve.frontends.http.metrics import ServerMetrics

LABELS = {"model_name": "tiny"}


def samples(text: str) -> dict[tuple[str, frozenset], float]:
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def scrape(server) -> dict[tuple[str, frozenset], float]:
    response = httpx.get(server.base_url + "/metrics", timeout=10)
    assert response.status_code == 200
    return samples(response.text)


def value(scraped, name, **labels) -> float:
    return scraped.get((name, frozenset({**LABELS, **labels}.items())), 0.0)


def test_metrics_are_prometheus_text_with_vllm_names(tiny_server):
    response = httpx.get(tiny_server.base_url + "/metrics")
    assert response.headers["content-type"].startswith("text/plain")
    families = {family.name: family.type for family in text_string_to_metric_families(response.text)}
    assert families == {
        "lmserve:num_requests_running": "gauge",
        "lmserve:num_requests_waiting": "gauge",
        "lmserve:kv_cache_usage_perc": "gauge",
        "lmserve:kv_cache_written_bytes": "gauge",
        "lmserve:num_interactive_sessions": "gauge",
        "lmserve:num_sessions_with_kept_kv": "gauge",
        "lmserve:num_preemptions": "counter",
        "lmserve:num_http_requests_running": "gauge",
        "lmserve:num_http_requests_waiting": "gauge",
        "lmserve:http_requests_rejected": "counter",
        "lmserve:prompt_tokens": "counter",
        "lmserve:generation_tokens": "counter",
        "lmserve:request_success": "counter",
        "lmserve:time_to_first_token_seconds": "histogram",
        "lmserve:inter_token_latency_seconds": "histogram",
        "lmserve:e2e_request_latency_seconds": "histogram",
    }
    assert "_created" not in response.text
    scraped = samples(response.text)
    assert value(scraped, "lmserve:num_requests_running") == 0
    assert 0 <= value(scraped, "lmserve:kv_cache_usage_perc") < 1


def test_openmetrics_when_asked(tiny_server):
    response = httpx.get(tiny_server.base_url + "/metrics", headers={"Accept": "application/openmetrics-text"})
    assert response.headers["content-type"].startswith("application/openmetrics-text")
    assert response.text.endswith("# EOF\n")


@pytest.mark.parametrize("stream", [False, True])
def test_a_finished_request_updates_tokens_and_latencies(tiny_server, stream):
    before = scrape(tiny_server)
    body = {"model": "tiny", "prompt": "hello", "max_tokens": 5, "ignore_eos": True, "stream": stream,
            **({"stream_options": {"include_usage": True}} if stream else {})}
    with httpx.stream("POST", tiny_server.base_url + "/v1/completions", json=body, timeout=60) as response:
        assert response.status_code == 200
        text = response.read().decode()
    prompt_tokens = int(text.split('"prompt_tokens":')[1].split(",")[0])
    after = scrape(tiny_server)

    def delta(name, **labels):
        return value(after, name, **labels) - value(before, name, **labels)

    assert delta("lmserve:prompt_tokens_total") == prompt_tokens
    assert delta("lmserve:generation_tokens_total") == 5
    assert delta("lmserve:request_success_total", finished_reason="length") == 1
    assert delta("lmserve:time_to_first_token_seconds_count") == 1
    assert delta("lmserve:e2e_request_latency_seconds_count") == 1
    assert delta("lmserve:inter_token_latency_seconds_count") == 4  # one gap per token after the first
    assert delta("lmserve:e2e_request_latency_seconds_sum") >= delta("lmserve:time_to_first_token_seconds_sum") > 0


# ------------------------------------------------------------------ in-process


class FakeBackend:
    def __init__(self, stats: BackendStats):
        self._stats = stats

    def stats(self) -> BackendStats:
        return self._stats


def fake_app_and_state(stats: BackendStats | None = None, sessions=()):
    stats = stats or BackendStats()
    state = SimpleNamespace(model_name="tiny", bus=SimpleNamespace(backend=FakeBackend(stats), sessions=sessions))
    return SimpleNamespace(ctx=SimpleNamespace()), state


def finished(completion_tokens=3, reason=FinishReason.STOP) -> GenerationOutput:
    timing = RequestTiming(arrival=10.0, first_token=10.5, finished=11.0, inter_token=(0.2, 0.3))
    return GenerationOutput("r", "", (), TokenUsage(7, completion_tokens), reason, timing=timing)


def test_every_app_has_its_own_registry():
    first, second = ServerMetrics(*fake_app_and_state()), ServerMetrics(*fake_app_and_state())
    first.observe_finished(finished())
    one, other = samples(first.render("")[0].decode()), samples(second.render("")[0].decode())
    assert value(one, "lmserve:generation_tokens_total") == 3
    assert value(one, "lmserve:request_success_total", finished_reason="stop") == 1
    assert value(one, "lmserve:inter_token_latency_seconds_count") == 2
    assert value(one, "lmserve:time_to_first_token_seconds_sum") == pytest.approx(0.5)
    assert value(other, "lmserve:generation_tokens_total") == 0


def test_load_is_read_from_the_backend_and_the_admission_queue_when_scraped():
    app, state = fake_app_and_state(BackendStats(num_running=3, num_waiting=2, kv_cache_usage=0.25, num_preemptions=7,
                                                 num_kept_sessions=4, kv_cache_written_bytes=3 << 20),
                                    sessions=[1, 2, 3, 4, 5])
    metrics = ServerMetrics(app, state)
    scraped = samples(metrics.render("")[0].decode())
    assert value(scraped, "lmserve:num_interactive_sessions") == 5
    assert value(scraped, "lmserve:num_sessions_with_kept_kv") == 4
    assert value(scraped, "lmserve:num_requests_running") == 3
    assert value(scraped, "lmserve:num_requests_waiting") == 2
    assert value(scraped, "lmserve:kv_cache_usage_perc") == 0.25
    assert value(scraped, "lmserve:kv_cache_written_bytes") == 3 << 20
    assert value(scraped, "lmserve:num_preemptions_total") == 7
    assert ("lmserve:num_http_requests_running", frozenset(LABELS.items())) not in scraped  # no queue set up
    app.ctx.admission = AdmissionQueue(max_running=4)
    app.ctx.admission.num_running = 2
    assert value(samples(metrics.render("")[0].decode()), "lmserve:num_http_requests_running") == 2


def test_a_request_finished_outside_any_http_request_is_ignored():
    assert metrics_plugin.lmserve_request_finished(request=None, output=finished(), elapsed_s=1.0) is None
