"""Peer pull: a decode worker's own pool as the source of a prompt's cached prefix for a prefill worker (Mooncake's
KV pool without the pool service). A decode worker keeps finished requests' full blocks findable by hash and
reports them in its KV events, so the scheduler knows how much of a prompt each one holds; the prefill worker
then fetches those blocks from it through the transports (the decode worker serves the cache service's Fetch) and
computes only the rest. Blocks chain per KV layout, so only a decode worker of exactly the prefill worker's layout
(block size included) can serve it, and only one with a transport backend the two can use between their hosts.
"""

from __future__ import annotations

import dataclasses

from kvmesh.services.kv_identity import KVLayout
from kvmesh.services.scheduler import pairing
from kvmesh.services.scheduler.registry import Role, Worker
from kvmesh.services.scheduler.route_types import PEER, RoutePlan, RouteQuery


def candidates(query: RouteQuery, workers) -> RouteQuery:
    """The query with every live decode worker as a possible peer, when any pool holds some of the prompt."""
    if not any(query.decode_cached_tokens.values()):
        return query
    return dataclasses.replace(query, peers=tuple(w for w in workers if w.spec.role == Role.DECODE))


def best(query: RouteQuery, layout: KVLayout) -> tuple[Worker | None, int]:
    """The peer of exactly `layout` whose pool holds the most leading prompt tokens, and how many; (None, 0) when
    none holds any. O(decode workers), once per layout: a prefill worker is checked against it alone."""
    holder, held = None, 0
    for worker in query.peers:
        n = query.decode_cached_tokens.get(worker.worker_id, 0)
        if n > held and worker.spec.layout == layout:
            holder, held = worker, n
    return holder, held


def reaches(peer: Worker | None, prefill: Worker) -> bool:
    """Whether the peer can write blocks into the prefill worker through some backend."""
    return peer is not None and pairing.pairs(peer, prefill)


def with_peer(query: RouteQuery, plan: RoutePlan) -> RoutePlan:
    """For a policy that decides no KV source (it fetches whatever the cache holds): fetch from the decode worker
    whose pool holds more of the prompt than the cache, where one does (slo_aware weighs peers itself)."""
    if plan.kv_source or plan.prefill is None or plan.local_prefill:
        return plan
    peer, held = best(query, plan.prefill.spec.layout)
    if held <= plan.num_cached_tokens or not reaches(peer, plan.prefill):
        return plan
    return dataclasses.replace(plan, num_cached_tokens=held, kv_source=PEER, kv_peer=peer,
                               why=f"pull {held} tokens from decode worker {peer.worker_id}'s pool")
