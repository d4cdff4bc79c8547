"""Prometheus metrics: every name exported in vLLM's style, served over a real HTTP port and as bytes."""

import urllib.request

from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.parser import text_string_to_metric_families

from kvmesh.services.common import metrics

NAMES = {
    "kvmesh:time_to_first_token_seconds": "histogram",
    "kvmesh:time_per_output_token_seconds": "histogram",
    "kvmesh:inter_token_latency_seconds": "histogram",
    "kvmesh:e2e_request_latency_seconds": "histogram",
    "kvmesh:num_requests_waiting": "gauge",
    "kvmesh:num_requests_running": "gauge",
    "kvmesh:kv_blocks_used": "gauge",
    "kvmesh:kv_blocks_free": "gauge",
    "kvmesh:kv_blocks_cached": "gauge",
    "kvmesh:prefix_cache_queries": "counter",
    "kvmesh:prefix_cache_hits": "counter",
    "kvmesh:kv_transfer_bytes": "counter",
    "kvmesh:kv_transfer_seconds": "histogram",
    "kvmesh:cache_hits": "counter",
    "kvmesh:cache_misses": "counter",
    "kvmesh:cache_bytes": "gauge",
    "kvmesh:route_decisions": "counter",
    "kvmesh:route_rejections": "counter",
    "kvmesh:handoff_late": "counter",
}


def _families(text: str) -> dict:
    return {f.name: f for f in text_string_to_metric_families(text)}


def _value(text: str, sample_name: str, **labels) -> float:
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == sample_name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    raise KeyError(sample_name)


def test_every_metric_is_exported_with_type_and_help():
    body, content_type = metrics.render_latest()
    assert content_type.startswith("text/plain")
    families = _families(body.decode())
    for name, kind in NAMES.items():
        assert families[name].type == kind, name
        assert len(families[name].documentation) > 20, name


def test_every_metric_metrics_py_defines_is_in_the_registry_it_serves():
    """One left in prometheus_client's global registry would never be scraped (kv_load_failures_total was)."""
    served = {family.name for family in metrics.REGISTRY.collect()}
    defined = {value.describe()[0].name for value in vars(metrics).values() if isinstance(value, MetricWrapperBase)}
    assert "kvmesh:kv_load_failures" in defined
    assert defined - served == set()


def test_metrics_server_on_a_free_port_serves_observations():
    metrics.observe_kv_transfer("shm", "send", 4096, 0.002)
    metrics.observe_request(ttft=0.3, e2e=1.3, num_output_tokens=11)
    metrics.CACHE_HITS.labels(tier="ssd").inc(3)
    port = metrics.start_metrics_server(0)
    try:
        assert port > 0
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    finally:
        metrics.stop_metrics_servers()
    assert _value(text, "kvmesh:kv_transfer_bytes_total", backend="shm", direction="send") >= 4096
    assert _value(text, "kvmesh:kv_transfer_seconds_count", backend="shm", direction="send") >= 1
    assert _value(text, "kvmesh:cache_hits_total", tier="ssd") >= 3
    assert _value(text, "kvmesh:time_per_output_token_seconds_sum") >= 0.1 - 1e-9
    assert _value(text, "kvmesh:time_to_first_token_seconds_bucket", le="0.5") >= 1
    assert "process_cpu_seconds_total" in text


def test_asgi_app_answers_a_scrape():
    import asyncio

    app = metrics.metrics_asgi_app()
    sent = []

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "method": "GET", "path": "/", "query_string": b"", "headers": []}
    asyncio.run(app(scope, receive, send))
    assert sent[0]["status"] == 200
    assert b"kvmesh:kv_blocks_free" in b"".join(m.get("body", b"") for m in sent[1:])
