"""Routing policies: pure functions that pick a (prefill, decode) pair from groups of compatible workers.

The router (router.py) does the shared work once — filter by model and layout, group by layout, apply admission
control — and hands a policy only groups in which every prefill worker may pair with every decode worker. A new
policy is one function here and one line in POLICIES.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from kvmesh.services.kv_identity import KVLayout, prefill_locally
from kvmesh.services.scheduler.registry import Worker


@dataclass(frozen=True)
class RouteQuery:
    """One request as the policies see it."""

    request_id: str
    prompt_token_ids: tuple[int, ...]
    model: str = ""
    layout: KVLayout | None = None
    cache_salt: str | None = None
    # leading prompt tokens the cache holds, per layout (filled by the scheduler's cache probe)
    cached_tokens: Mapping[KVLayout, int] = field(default_factory=dict)
    # leading prompt tokens each decode worker's own pool holds, by worker id (from its KV events)
    decode_cached_tokens: Mapping[str, int] = field(default_factory=dict)
    # workers this request already failed on (a retry): left out while their role has another candidate
    avoid_worker_ids: frozenset[str] = frozenset()


@dataclass(frozen=True)
class Candidates:
    """Workers sharing one KV layout: any prefill here may write into any decode here. A group of colocated
    decode workers has no prefill worker."""

    layout: KVLayout
    prefill: tuple[Worker, ...]
    decode: tuple[Worker, ...]


@dataclass(frozen=True)
class RoutePlan:
    """The decision: where to prefill, where to decode, how many prompt tokens the cache and the chosen decode
    worker's own pool already hold, and whether the decode worker prefills the prompt itself (`local_prefill`,
    set by the router from `decode_prefills`)."""

    prefill: Worker | None  # None: a colocated decode worker, which prefills the prompt itself
    decode: Worker
    num_cached_tokens: int
    policy: str
    num_decode_cached_tokens: int = 0
    local_prefill: bool = False


Policy = Callable[[RouteQuery, Sequence[Candidates]], RoutePlan]


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


# Rough CPU figures for the TTFT estimate; only their ratios steer the choice. Importing a cached block (fetch,
# checksum, copy into the pool) runs about an order of magnitude faster than computing its tokens; handing a
# computed token's KV to the decode worker is faster still, but not free.
PREFILL_TOKENS_PER_S = 4_000.0
FETCH_TOKENS_PER_S = 40_000.0
TRANSFER_TOKENS_PER_S = 100_000.0
QUEUED_PREFILL_S = 0.1  # wait behind each prompt already in flight on the prefill worker
QUEUED_DECODE_S = 0.05  # wait behind each request queued on the decode worker
#: A decode worker holding every full block of a prompt prefills a tail this short itself (the decode worker's
#: --local-prefill-max-tokens default; the plan carries the decision and the worker obeys it).
LOCAL_PREFILL_MAX_TOKENS = 16


def decode_prefills(num_prompt_tokens: int, num_decode_cached_tokens: int, decode: Worker) -> bool:
    """Whether the decode worker holding `num_decode_cached_tokens` of the prompt prefills it itself
    (`kv_identity.prefill_locally` with the worker's registered limit: its own rule for plans that do not say)."""
    if decode.spec.colocated:
        return True
    limit = decode.spec.local_prefill_max_tokens
    return prefill_locally(num_prompt_tokens, num_decode_cached_tokens, decode.spec.layout.block_size,
                           LOCAL_PREFILL_MAX_TOKENS if limit is None else limit)


def estimated_ttft(query: RouteQuery, layout: KVLayout, prefill: Worker | None, decode: Worker) -> float:
    """Seconds to the first token on this pair: queue waits + prefill of what the cache does not hold + fetch of
    what it holds + the handoff of every token the decode worker does not hold.

    The decode worker's own hit spares the handoff of those tokens, not their compute: the prefill worker still
    computes every token the cache cannot give it. Only when the decode worker holds every full block and the tail
    is short does it prefill the tail itself, without the prefill worker. A decode worker without room for the
    prompt's blocks waits too."""
    n = len(query.prompt_token_ids)
    held = query.decode_cached_tokens.get(decode.worker_id, 0)
    hit = query.cached_tokens.get(layout, 0)
    wait = (decode.load.num_waiting + decode.num_routed) * QUEUED_DECODE_S
    if decode.load.num_total_blocks and decode.load.num_free_blocks * layout.block_size < n:
        wait += QUEUED_PREFILL_S
    if prefill is None or decode_prefills(n, held, decode):  # colocated, or a short tail after a full hit
        return wait + (n - held) / PREFILL_TOKENS_PER_S
    # routed since the heartbeat: queued behind those prompts too, in proportion to their length
    wait += ((prefill.load.num_waiting + prefill.load.num_running + prefill.num_routed) * QUEUED_PREFILL_S
             + prefill.num_routed_tokens / PREFILL_TOKENS_PER_S)
    return wait + (n - hit) / PREFILL_TOKENS_PER_S + hit / FETCH_TOKENS_PER_S + (n - held) / TRANSFER_TOKENS_PER_S


def kv_aware(query: RouteQuery, groups: Sequence[Candidates]) -> RoutePlan:
    """The pair with the least estimated TTFT (ties: the less loaded decode worker, then registration order)."""
    _, _, group, prefill, decode = min(
        ((estimated_ttft(query, g.layout, p, d), load_score(d), g, p, d)
         for g in groups for d in g.decode for p in (g.prefill or (None,))), key=lambda item: item[:2])
    return RoutePlan(prefill, decode, query.cached_tokens.get(group.layout, 0), policy="kv_aware",
                     num_decode_cached_tokens=query.decode_cached_tokens.get(decode.worker_id, 0))


POLICIES: dict[str, Policy] = {
    "least_loaded": least_loaded,
    "kv_aware": kv_aware,
}


def get_policy(name: str) -> Policy:
    """The policy registered under name; KeyError lists the known ones."""
    try:
        return POLICIES[name]
    except KeyError:
        raise KeyError(f"unknown routing policy {name!r}; known: {sorted(POLICIES)}") from None
