"""The routing work shared by every policy: validation, compatibility, admission control."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from kvmesh.services.common.errors import CapacityError, InvalidArgumentError, UnavailableError
from kvmesh.services.scheduler.policies import Candidates, Policy, RoutePlan, RouteQuery, decode_prefills
from kvmesh.services.kv_identity import KVLayout
from kvmesh.services.scheduler.registry import Role, Worker


def _matches(query: RouteQuery, worker: Worker) -> bool:
    spec = worker.spec
    if spec.layout is None:
        return False
    if query.layout is not None and spec.layout != query.layout:
        return False
    return not query.model or query.model in (spec.model, spec.layout.model_id)


def group_by_layout(query: RouteQuery, workers: Sequence[Worker]) -> list[Candidates]:
    """Groups of matching workers with equal layouts that have at least one prefill and one decode worker, and
    groups of colocated decode workers (no prefill worker: each prefills its own prompts; never paired with one)."""
    by_layout: dict[KVLayout, tuple[list[Worker], list[Worker]]] = {}
    colocated: dict[KVLayout, list[Worker]] = {}
    for worker in workers:
        spec = worker.spec
        if spec.role not in (Role.PREFILL, Role.DECODE) or not _matches(query, worker):
            continue
        if spec.colocated:
            colocated.setdefault(spec.layout, []).append(worker)
        else:
            prefill, decode = by_layout.setdefault(spec.layout, ([], []))
            (prefill if spec.role == Role.PREFILL else decode).append(worker)
    return ([Candidates(layout, tuple(p), tuple(d)) for layout, (p, d) in by_layout.items() if p and d]
            + [Candidates(layout, (), tuple(d)) for layout, d in colocated.items()])


def _avoiding(query: RouteQuery, workers: Sequence[Worker]) -> Sequence[Worker]:
    """workers without those the query avoids, unless that leaves a role with none (a lone worker is retried)."""
    if not query.avoid_worker_ids:
        return workers
    kept = [w for w in workers if w.worker_id not in query.avoid_worker_ids]
    left = {w.spec.role for w in kept}
    return [w for w in workers if w.worker_id not in query.avoid_worker_ids or w.spec.role not in left]


#: Seconds a refused request is told to wait per request the shortest decode queue is over its limit (a hint in
#: whole seconds, at least 1; the fitted cost models of the SLO router are to replace it).
RETRY_AFTER_PER_QUEUED_S = 0.5


def _admit(groups: list[Candidates], max_queue: int) -> list[Candidates]:
    admitted = []
    for group in groups:
        decode = tuple(d for d in group.decode if d.load.num_waiting < max_queue)
        if decode:
            admitted.append(Candidates(group.layout, group.prefill, decode))
    return admitted


def route(query: RouteQuery, workers: Sequence[Worker], policy: Policy, max_queue: int) -> RoutePlan:
    """Pick a (prefill, decode) pair with equal layouts for query (or a colocated decode worker alone), and decide
    whether the decode worker prefills the prompt itself (the plan carries it; the worker obeys).

    InvalidArgumentError for an empty prompt, UnavailableError when no compatible pair is registered,
    CapacityError when every compatible decode worker has max_queue or more requests waiting.
    """
    if not query.prompt_token_ids:
        raise InvalidArgumentError("prompt_token_ids must not be empty")
    if any(t < 0 for t in query.prompt_token_ids):
        raise InvalidArgumentError("prompt_token_ids must be non-negative")
    groups = group_by_layout(query, _avoiding(query, workers))
    if not groups:
        wanted = f"model {query.model!r}" if query.model else "any model"
        raise UnavailableError(f"no prefill and decode worker pair with equal KV layouts (nor a colocated worker) is "
                               f"registered for {wanted} "
                               f"({len(workers)} workers live)")
    admitted = _admit(groups, max_queue)
    if not admitted:
        shortest = min(d.load.num_waiting for g in groups for d in g.decode)
        raise CapacityError(f"every decode worker has {max_queue} or more requests waiting; retry later",
                            retry_after_s=RETRY_AFTER_PER_QUEUED_S * (shortest - max_queue + 1))
    plan = policy(query, admitted)
    local = decode_prefills(len(query.prompt_token_ids), plan.num_decode_cached_tokens, plan.decode)
    return dataclasses.replace(plan, local_prefill=local)
