"""The routing work shared by every policy: validation, compatibility, admission control."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from kvmesh.services.common.errors import InvalidArgumentError, UnavailableError
from kvmesh.services.scheduler import admission, pairing, peers
from kvmesh.services.scheduler.predict import decode_prefills
from kvmesh.services.scheduler.route_types import Candidates, Policy, RoutePlan, RouteQuery
from kvmesh.services.scheduler.slo_aware import check_objectives
from kvmesh.services.kv_identity import KVLayout
from kvmesh.services.scheduler.registry import Role, Worker
from kvmesh.transports.rechunk import unmappable


def _matches(query: RouteQuery, worker: Worker) -> bool:
    spec = worker.spec
    if spec.layout is None:
        return False
    if query.layout is not None and spec.layout != query.layout:
        return False
    return not query.model or query.model in (spec.model, spec.layout.model_id)


def group_by_layout(query: RouteQuery, workers: Sequence[Worker]) -> list[Candidates]:
    """Groups of matching workers: each prefill layout's workers with every decode worker whose layout its KV maps
    onto (equal but for the block size: the transfer re-chunks), where there is at least one of each; and groups of
    colocated decode workers (no prefill worker: each prefills its own prompts; never paired with one). A group's
    layout is its prefill workers' (the one the cache probe answered for)."""
    prefills: dict[KVLayout, list[Worker]] = {}
    decodes: dict[KVLayout, list[Worker]] = {}
    colocated: dict[KVLayout, list[Worker]] = {}
    for worker in workers:
        spec = worker.spec
        if spec.role not in (Role.PREFILL, Role.DECODE) or not _matches(query, worker):
            continue
        if spec.colocated:
            colocated.setdefault(spec.layout, []).append(worker)
        elif spec.role == Role.PREFILL:
            prefills.setdefault(spec.layout, []).append(worker)
        else:
            decodes.setdefault(mapping_key(spec.layout), []).append(worker)
    return ([Candidates(layout, tuple(p), tuple(decodes[mapping_key(layout)])) for layout, p in prefills.items()
             if decodes.get(mapping_key(layout))]
            + [Candidates(layout, (), tuple(d)) for layout, d in colocated.items()])


def mapping_key(layout: KVLayout) -> KVLayout:
    """What two layouts must share for KV to move between them: all but the block size (`unmappable`)."""
    return dataclasses.replace(layout, block_size=0)


def unmapped(query: RouteQuery, workers: Sequence[Worker]) -> str:
    """Why the matching prefill workers' KV maps onto no matching decode worker: each pair of layouts with what
    differs (model, dtype, layers, KV heads, head size), at most three; "" when a role has no worker."""
    def layouts(role: Role) -> list[KVLayout]:
        return sorted({w.spec.layout for w in workers if w.spec.role == role and not w.spec.colocated
                       and _matches(query, w)}, key=str)
    pairs = [(p, d) for p in layouts(Role.PREFILL) for d in layouts(Role.DECODE)]
    return "; ".join(f"prefill {_short(p)} -> decode {_short(d)}: {unmappable(p, d)}" for p, d in pairs[:3])


def unpairable(worker: Worker, workers: Sequence[Worker]) -> str:
    """Why a prefill (or non-colocated decode) worker's KV maps onto no registered worker of the other role of its
    model, naming what differs from each; "" when one maps, or when none of its model is registered (yet)."""
    spec = worker.spec
    if spec.layout is None or spec.colocated or spec.role not in (Role.PREFILL, Role.DECODE):
        return ""
    other = Role.DECODE if spec.role == Role.PREFILL else Role.PREFILL
    peers = {w.spec.layout for w in workers if w.spec.role == other and not w.spec.colocated
             and w.spec.layout is not None and w.spec.layout.model_id == spec.layout.model_id}
    reasons = {_short(p): unmappable(spec.layout, p) for p in peers}
    if not reasons or not all(reasons.values()):
        return ""
    return "; ".join(f"{other.name.lower()} {name}: {why}" for name, why in sorted(reasons.items())[:3])


def _short(layout: KVLayout) -> str:
    return (f"{layout.model_id}:{layout.dtype} L{layout.num_layers} H{layout.num_kv_heads}x{layout.head_dim} "
            f"B{layout.block_size}")


def _avoiding(query: RouteQuery, workers: Sequence[Worker]) -> Sequence[Worker]:
    """workers without those the query avoids, unless that leaves a role with none (a lone worker is retried)."""
    if not query.avoid_worker_ids:
        return workers
    kept = [w for w in workers if w.worker_id not in query.avoid_worker_ids]
    left = {w.spec.role for w in kept}
    return [w for w in workers if w.worker_id not in query.avoid_worker_ids or w.spec.role not in left]


def route(query: RouteQuery, workers: Sequence[Worker], policy: Policy,
          max_queue: int | admission.QueueLimits) -> RoutePlan:
    """Pick a (prefill, decode) pair with mappable layouts for query (or a colocated decode worker alone), and decide
    whether the decode worker prefills the prompt itself (the plan carries it; the worker obeys).

    InvalidArgumentError for an empty prompt, UnavailableError when no compatible pair is registered (equal
    layouts, and a transport backend both offer and can use between their hosts: pairing.py),
    CapacityError (with a retry-after from the predicted drain) when no compatible decode worker can take the
    request (admission.py: max_queue — or the limit of the request's priority — or more requests queued, or no
    room in its KV pool for the request's prompt plus max_tokens, counting those routed since its last
    heartbeat), or when the policy finds no route that meets the request's objectives.
    """
    admitted = admissible(query, workers, max_queue)
    query = peers.candidates(query, workers)
    plan = policy(query, admitted)
    if plan.decode.spec.colocated:
        plan = dataclasses.replace(plan, local_prefill=True)
    elif not plan.kv_source:  # the policy did not decide where the KV comes from: the decode worker's rule
        local = decode_prefills(len(query.prompt_token_ids), plan.num_decode_cached_tokens, plan.decode)
        plan = peers.with_peer(query, dataclasses.replace(plan, local_prefill=local))
    check_objectives(query, admitted, plan)  # early rejection, whatever the policy
    return plan


def admissible(query: RouteQuery, workers: Sequence[Worker],
               max_queue: int | admission.QueueLimits) -> list[Candidates]:
    """The candidate groups that may take the request, by everything route checks before any policy weighs it
    (the prompt, layouts and pairing, queue and pool limits); raises what route would. None of it depends on the
    cache, so the scheduler asks it before its cache probe: such a refusal never waits on the cache."""
    if not query.prompt_token_ids:
        raise InvalidArgumentError("prompt_token_ids must not be empty")
    if min(query.prompt_token_ids) < 0:
        raise InvalidArgumentError("prompt_token_ids must be non-negative")
    groups = group_by_layout(query, _avoiding(query, workers))
    if not groups:
        wanted = f"model {query.model!r}" if query.model else "any model"
        why = unmapped(query, workers)
        raise UnavailableError(f"no prefill and decode worker pair whose KV layouts map onto each other (equal but "
                               f"for the block size), nor a colocated worker, is registered for {wanted} "
                               f"({len(workers)} workers live)" + (f": {why}" if why else ""))
    paired = [g for group in groups for g in pairing.split(group)]
    if not paired:
        raise pairing.unpaired(groups)
    return admission.admit(query, paired, max_queue)
