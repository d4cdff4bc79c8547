"""What a KV transfer looks like from outside: the services turn the transports' `TransferStats` into the
`kv.transfer` span and the Prometheus transfer metrics. Transports import nothing of the services; every service
that makes a `Sender` or `Receiver` passes `report` as its observer.

The span is made after the fact from the stats' timeline (start, per-layer send times, end), in the context of the
call that opened the transfer (sender) or waited for it (receiver), so it joins that request's trace.
"""

from __future__ import annotations

from opentelemetry import trace

from kvmesh.services.common import metrics
from kvmesh.services.common import conventions as names
from kvmesh.services.common.transfer_samples import SENT
from kvmesh.transports.base import TransferStats

TRACER = "kvmesh.transports"  # the instrumentation scope transfer spans have always carried
EVENT_LAYER_SENT = "kv.layer_sent"


def report(stats: TransferStats) -> None:
    """The transfer observer: metrics for a finished transfer (none for a failed one) and its `kv.transfer` span,
    with the raw `kv.*` figures, the conventional `kvmesh.kv.*` attributes, a `kv.layer_sent` event per layer
    sent, and `kv.error` when it failed."""
    if not stats.error:
        metrics.observe_kv_transfer(stats.backend, stats.direction, stats.bytes, stats.seconds)
    span = trace.get_tracer(TRACER).start_span(names.KV_TRANSFER, start_time=stats.start_ns or None)
    span.set_attributes({"kv.backend": stats.backend, "kv.transfer_id": stats.transfer_id,
                         names.ATTR_KV_BACKEND: stats.backend, names.ATTR_KV_DIRECTION: stats.direction})
    for layer, nbytes, at_ns in stats.layer_times:  # show that layers leave while later ones compute
        span.add_event(EVENT_LAYER_SENT, {names.ATTR_KV_LAYER: layer, names.ATTR_KV_BYTES: nbytes},
                       timestamp=at_ns)
    if stats.error:
        span.set_attribute("kv.error", stats.error)
    else:
        span.set_attributes({f"kv.{k}": v for k, v in stats.to_dict().items()})
        span.set_attributes({names.ATTR_KV_BACKEND: stats.backend, names.ATTR_KV_DIRECTION: stats.direction,
                             names.ATTR_KV_BYTES: stats.bytes, names.ATTR_KV_BLOCKS: stats.blocks,
                             names.ATTR_KV_GBPS: stats.gbps, "kvmesh.kv.seconds": stats.seconds})
    span.end(end_time=stats.end_ns or None)


def report_sent(stats: TransferStats) -> None:
    """A handoff sender's observer: `report`, and the transfer kept for the scheduler's link models (sent on the
    next heartbeat)."""
    report(stats)
    SENT.observe(stats)
