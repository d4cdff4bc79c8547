"""A synthetic span file made by the real OTel SDK and kvmesh's JSON-lines exporter, three services, five requests.

Plus one background trace (no gateway.Generate) longer than all of them. Request i has every time scaled by (1 + i/10); in milliseconds at scale 1 (TTFT 200):

    gateway.Generate            0-300  kvmesh.ttft_s = 0.2
      scheduler.route           2-7     queue
      decode.admit              8-10    queue        (decode service, remote parent through inject/extract)
        prefill.queue          12-30    queue        (prefill service, a second remote hop)
        cache.lookup           30-34    cache
        cache.get              34-50    cache
        prefill.compute        50-170   prefill
          kv.transfer   60-80, 100-120, 160-185       (hidden by compute but for 170-185)
      decode.stream           190-300   (after the first token: no phase)

so TTFT 200 = queue 25 + cache 20 + prefill 120 + transfer 15 + other 20.
"""

import pytest
from opentelemetry import trace

from kvmesh.services.common import telemetry

EXPECTED_MS = {"queue": 25.0, "cache": 20.0, "prefill": 120.0, "transfer": 15.0, "other": 20.0}
T0_NS = 1_800_000_000 * 10**9


def _span(tracer, name, parent_ctx, start_ms, end_ms, scale, **attrs):
    span = tracer.start_span(name, context=parent_ctx, start_time=T0_NS + int(start_ms * scale * 1e6),
                             attributes=attrs)
    span.end(end_time=T0_NS + int(end_ms * scale * 1e6))
    return span


def _request(tracers, i: int, base_ms: float) -> None:
    gw, dec, pre = tracers
    s = 1 + i / 10
    rid = f"r-{i}"

    def at(ms):  # absolute ms on this request's clock
        return base_ms / s + ms

    root = gw.start_span("gateway.Generate", start_time=T0_NS + int(at(0) * s * 1e6),
                         attributes={"kvmesh.request_id": rid, "kvmesh.ttft_s": 0.2 * s})
    root_ctx = trace.set_span_in_context(root)
    _span(gw, "scheduler.route", root_ctx, at(2), at(7), s, **{"kvmesh.request_id": rid})
    with trace.use_span(root):
        carrier = telemetry.inject({})
    admit = _span(dec, "decode.admit", telemetry.extract(carrier), at(8), at(10), s, **{"kvmesh.kv.blocks": 4})
    with trace.use_span(admit):
        carrier = telemetry.inject({"request_id": rid})
    remote = telemetry.extract(carrier)
    _span(pre, "prefill.queue", remote, at(12), at(30), s)
    _span(pre, "cache.lookup", remote, at(30), at(34), s, **{"kvmesh.cache.hit_blocks": 2})
    _span(pre, "cache.get", remote, at(34), at(50), s, **{"kvmesh.kv.bytes": 65536, "kvmesh.cache.tier": "dram"})
    compute = _span(pre, "prefill.compute", remote, at(50), at(170), s, **{"kvmesh.request_id": rid})
    compute_ctx = trace.set_span_in_context(compute)
    for a, b in ((60, 80), (100, 120), (160, 185)):
        _span(pre, "kv.transfer", compute_ctx, at(a), at(b), s, **{
            "kvmesh.kv.bytes": 1 << 20, "kvmesh.kv.blocks": 4, "kvmesh.kv.backend": "shm", "kvmesh.kv.gbps": 0.05})
    _span(dec, "decode.stream", root_ctx, at(190), at(300), s, **{"kvmesh.output_tokens": 16})
    root.end(end_time=T0_NS + int(at(300) * s * 1e6))


@pytest.fixture
def expected_ms():
    """Each phase's milliseconds of TTFT at scale 1."""
    return dict(EXPECTED_MS)


@pytest.fixture(scope="module")
def span_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("spans") / "spans.jsonl"
    env = {"OTEL_TRACES_EXPORTER": "jsonl", "KVMESH_TRACES_FILE": str(path)}
    providers = [telemetry.build_provider(name, name, f"{name}-0", env) for name in ("gateway", "decode", "prefill")]
    tracers = [p.get_tracer("test") for p in providers]
    for i in range(5):
        _request(tracers, i, base_ms=1000.0 * i)
    # Background work in its own trace, longer than any request: neither a request nor among the slowest.
    _span(tracers[0], "scheduler.expire_leases", None, 0, 10_000, 1)
    for provider in providers:
        provider.shutdown()
    return path
