"""Routing policies: pure functions that pick a (prefill, decode) pair from groups of compatible workers.

The router (router.py) does the shared work once — filter by model and layout, group by layout, apply admission
control — and hands a policy only groups in which every prefill worker may pair with every decode worker. A new
policy is one function here and one line in POLICIES.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

from kvmesh.services.kv_identity import KVLayout
from kvmesh.services.scheduler import predict
from kvmesh.services.scheduler.registry import Worker
from kvmesh.services.scheduler.route_types import Candidates, Links, Policy, Prediction, RoutePlan, RouteQuery
from kvmesh.services.scheduler.predict import decode_prefills
from kvmesh.services.scheduler.slo_aware import slo_aware

__all__ = ["decode_prefills", "Candidates", "Links", "Policy", "Prediction", "RoutePlan", "RouteQuery", "POLICIES",
           "get_policy"]


def load_score(worker: Worker) -> float:
    """How busy a worker is: queued plus running requests as of its last heartbeat, plus the requests routed to
    it since, plus the used fraction of its KV pool."""
    load = worker.load
    used = 0.0
    if load.num_total_blocks > 0:
        used = 1.0 - load.num_free_blocks / load.num_total_blocks
    return load.num_waiting + load.num_running + worker.num_routed + used


def least_loaded(query: RouteQuery, groups: Sequence[Candidates]) -> RoutePlan:
    """The least loaded decode worker, then the least loaded prefill worker of its layout (ties: first registered)."""
    group, decode = min(((g, d) for g in groups for d in g.decode), key=lambda gd: load_score(gd[1]))
    prefill = min(group.prefill, key=load_score, default=None)
    return RoutePlan(prefill, decode, query.cached_tokens.get(group.layout, 0), policy="least_loaded",
                     num_decode_cached_tokens=query.decode_cached_tokens.get(decode.worker_id, 0))


def estimated_ttft(query: RouteQuery, layout: KVLayout, prefill: Worker | None, decode: Worker) -> float:
    """Seconds to the first token on this pair, from the workers' fitted models: the prefill worker's queue, its
    compute of what the cache does not hold, the fetch of what it holds (always: kv_aware never weighs
    recomputing it instead), the handoff of every token the decode worker does not hold, and the decode worker's
    next step. The decode worker's own hit spares the handoff of those tokens, not their compute; only when it
    holds every full block and the tail is short does it prefill the tail itself, without the prefill worker."""
    n = len(query.prompt_token_ids)
    held = query.decode_cached_tokens.get(decode.worker_id, 0)
    hit = query.cached_tokens.get(layout, 0)
    ssd = min(query.cached_ssd_tokens.get(layout, 0), hit)
    step = predict.step_s(decode)
    if prefill is None or decode_prefills(n, held, decode):  # colocated, or a short tail after a full hit
        return predict.local_backlog_s(decode) + predict.compute_s(decode, held, n - held) + step
    return (predict.prefill_backlog_s(prefill, n) + predict.fetch_s(query.links, layout, hit - ssd, ssd, prefill)
            + predict.compute_s(prefill, hit, n - hit) + predict.transfer_s(query.links, layout, n - held, prefill,
                                                                             decode) + step)


def _best_prefill(query: RouteQuery, group: Candidates) -> Worker | None:
    """The group's prefill worker with the least queue + fetch + compute for the prompt (None: colocated)."""
    n, hit = len(query.prompt_token_ids), query.cached_tokens.get(group.layout, 0)
    return min(group.prefill, default=None,
               key=lambda p: predict.prefill_backlog_s(p, n) + predict.compute_s(p, hit, n - hit))


def kv_aware(query: RouteQuery, groups: Sequence[Candidates]) -> RoutePlan:
    """The pair with the least estimated TTFT (ties: the less loaded decode worker, then registration order).
    The prefill worker's part of the estimate does not depend on the decode worker: each group's best prefill
    worker is found once, so a decision costs O(prefill + decode workers), not their product."""
    _, _, group, prefill, decode = min(
        ((estimated_ttft(query, g.layout, p, d), load_score(d), g, p, d)
         for g in groups for p in (_best_prefill(query, g),) for d in g.decode), key=lambda item: item[:2])
    return RoutePlan(prefill, decode, query.cached_tokens.get(group.layout, 0), policy="kv_aware",
                     num_decode_cached_tokens=query.decode_cached_tokens.get(decode.worker_id, 0))


def round_robin(query: RouteQuery, groups: Sequence[Candidates]) -> RoutePlan:
    """Each role's workers in turn: the decode worker, then the prefill worker of its layout, with the fewest
    routes since registration (ties: first registered). Blind to load and cache: the baseline."""
    group, decode = min(((g, d) for g in groups for d in g.decode), key=lambda gd: gd[1].num_routed_total)
    prefill = min(group.prefill, key=lambda w: w.num_routed_total, default=None)
    return RoutePlan(prefill, decode, query.cached_tokens.get(group.layout, 0), policy="round_robin",
                     num_decode_cached_tokens=query.decode_cached_tokens.get(decode.worker_id, 0))


def _two(workers: Sequence, salt: str) -> list:
    """Two distinct workers drawn by a hash of salt (a pure function of the request; all of them when <= 2)."""
    if len(workers) <= 2:
        return list(workers)
    h = int.from_bytes(hashlib.blake2b(salt.encode(), digest_size=8).digest(), "big")
    i, j = h % len(workers), (h // len(workers)) % (len(workers) - 1)
    return [workers[i], workers[j + (j >= i)]]


def power_of_two(query: RouteQuery, groups: Sequence[Candidates]) -> RoutePlan:
    """The less loaded of two decode workers drawn at random (seeded by the request id), then likewise for the
    prefill worker of its layout: near least_loaded's balance without every router herding onto one worker."""
    pairs = [(g, d) for g in groups for d in g.decode]
    group, decode = min(_two(pairs, query.request_id + "/decode"), key=lambda gd: load_score(gd[1]))
    prefill = min(_two(group.prefill, query.request_id + "/prefill"), key=load_score, default=None)
    return RoutePlan(prefill, decode, query.cached_tokens.get(group.layout, 0), policy="power_of_two",
                     num_decode_cached_tokens=query.decode_cached_tokens.get(decode.worker_id, 0))


POLICIES: dict[str, Policy] = {
    "slo_aware": slo_aware,
    "least_loaded": least_loaded,
    "kv_aware": kv_aware,
    "round_robin": round_robin,
    "power_of_two": power_of_two,
}


def get_policy(name: str) -> Policy:
    """The policy registered under name; KeyError lists the known ones."""
    try:
        return POLICIES[name]
    except KeyError:
        raise KeyError(f"unknown routing policy {name!r}; known: {sorted(POLICIES)}") from None
