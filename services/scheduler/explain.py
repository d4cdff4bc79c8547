"""What the scheduler believes and why it routed as it did, for operators: the route span's attributes and
events (each candidate's predictions, the KV source and why), the Stats message and the cost-model and
link-model gauges."""

from __future__ import annotations

from kvmesh.services.common import metrics
from kvmesh.services.scheduler.links import LinkBook
from kvmesh.services.scheduler.registry import Registry, Role, Worker
from kvmesh.services.scheduler.route_types import RoutePlan
from kvmesh.services.scheduler.router import unpairable
from kvmesh.v1 import scheduler_pb2

ATTR_KV_SOURCE = "kvmesh.route.kv_source"
ATTR_WHY = "kvmesh.route.why"
ATTR_PREDICTED_TTFT = "kvmesh.route.predicted_ttft_s"
ATTR_PREDICTED_TPOT = "kvmesh.route.predicted_tpot_s"
ATTR_KV_PEER = "kvmesh.route.kv_peer"  # kv_source "peer": the decode worker whose pool serves the prefix
EVENT_CANDIDATE = "route.candidate"


def record_plan(span, plan: RoutePlan) -> None:
    """Put the plan's KV source, reason and predictions on the route span, and one event per candidate the policy
    weighed (the plan carries the best few: a bounded count)."""
    if not plan.kv_source:
        return
    span.set_attributes({ATTR_KV_SOURCE: plan.kv_source, ATTR_WHY: plan.why,
                         ATTR_PREDICTED_TTFT: plan.predicted_ttft_s, ATTR_PREDICTED_TPOT: plan.predicted_tpot_s})
    if plan.kv_peer is not None:
        span.set_attribute(ATTR_KV_PEER, plan.kv_peer.worker_id)
    for p in plan.candidates:
        span.add_event(EVENT_CANDIDATE, {
            "prefill": p.prefill.worker_id if p.prefill is not None else "", "decode": p.decode.worker_id,
            "kv_source": p.kv_source, "predicted_ttft_s": p.ttft_s, "predicted_tpot_s": p.tpot_s,
            "wait_s": p.wait_s, "chosen": p.decode is plan.decode and p.kv_source == plan.kv_source})


def model_of(worker: Worker, unpaired: str = "") -> scheduler_pb2.WorkerModel:
    """The WorkerModel message of a worker's current fit (and why it pairs with no worker, if it does not)."""
    fit = worker.fit
    return scheduler_pb2.WorkerModel(
        worker_id=worker.worker_id, role=int(worker.spec.role), prefill=[fit.prefill.a, fit.prefill.b, fit.prefill.c],
        decode=[fit.decode.a, fit.decode.b, fit.decode.c], num_samples=fit.num_samples,
        num_outliers=fit.num_outliers, unpaired=unpaired)


def links_of(book: LinkBook | None, registry: Registry) -> list[scheduler_pb2.LinkModel]:
    """The LinkModel messages of the book's links whose sender is live (and every fallback)."""
    if book is None:
        return []
    live = {w.worker_id for w in registry.workers()}
    return [scheduler_pb2.LinkModel(kind=kind, sender_id=sender, receiver=receiver, backend=backend,
                                    fixed_seconds=fit.fixed_s, gbps=fit.gbps, ssd_gbps=fit.ssd_gbps,
                                    num_samples=fit.num_samples, num_outliers=fit.num_outliers, fitted=fit.fitted)
            for kind, sender, receiver, backend, fit in book.entries() if not sender or sender in live]


def stats(registry: Registry, policy: str, book: LinkBook | None = None) -> scheduler_pb2.SchedulerStats:
    """Every live prefill and decode worker's models, and the KV link models."""
    everyone = registry.workers()
    workers = [w for w in everyone if w.spec.role in (Role.PREFILL, Role.DECODE)]
    return scheduler_pb2.SchedulerStats(models=[model_of(w, unpairable(w, everyone)) for w in workers], policy=policy,
                                        links=links_of(book, registry))


def observe_links(book: LinkBook | None, registry: Registry) -> None:
    """Set the link-model gauges to the book's links of live senders (a departed sender's series go)."""
    metrics.SCHEDULER_LINK_MODEL.clear()
    for link in links_of(book, registry):
        labels = (link.kind, link.sender_id, link.receiver, link.backend)
        for coef, value in (("fixed_s", link.fixed_seconds), ("gbps", link.gbps), ("ssd_gbps", link.ssd_gbps),
                            ("n", link.num_samples)):
            metrics.SCHEDULER_LINK_MODEL.labels(*labels, coef).set(value)


def observe_models(registry: Registry) -> None:
    """Set the cost-model gauges to the live workers' fits (a departed worker's series go)."""
    metrics.SCHEDULER_COST_MODEL.clear()
    for worker in registry.workers():
        if worker.spec.role not in (Role.PREFILL, Role.DECODE):
            continue
        fit = worker.fit
        for name, model in (("prefill", fit.prefill), ("decode", fit.decode)):
            for coef in ("a", "b", "c"):
                metrics.SCHEDULER_COST_MODEL.labels(worker.worker_id, name, coef).set(getattr(model, coef))
        metrics.SCHEDULER_COST_MODEL.labels(worker.worker_id, "prefill", "n").set(fit.num_samples)
