"""The routing work shared by every policy: validation, compatibility, admission control."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from kvmesh.services.common.errors import CapacityError, InvalidArgumentError, UnavailableError
from kvmesh.services.scheduler import predict
from kvmesh.services.scheduler.predict import decode_prefills
from kvmesh.services.scheduler.route_types import Candidates, Policy, RoutePlan, RouteQuery
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


#: The least retry-after hint of an admission refusal (seconds; the client sees whole seconds, at least 1).
MIN_RETRY_AFTER_S = 0.05


def queued(decode: Worker) -> int:
    """Requests a decode worker has queued: those waiting at its last heartbeat (a colocated worker's prompts not
    yet computed too) plus those the scheduler routed to it since, which no heartbeat shows yet."""
    pending = decode.load.num_pending_prefill if decode.spec.colocated else 0
    return decode.load.num_waiting + pending + decode.num_routed


def drain_s(group: Candidates, decode: Worker, num_prompt_tokens: int, num_requests: int) -> float:
    """Predicted seconds until num_requests prompts like this one have left the decode worker's queue: computed
    by its own engine (colocated) or by the group's prefill workers in parallel."""
    if not group.prefill:
        return num_requests * predict.compute_s(decode, 0, num_prompt_tokens)
    fastest = min(predict.compute_s(p, 0, num_prompt_tokens) for p in group.prefill)
    return num_requests * fastest / len(group.prefill)


def _admit(groups: list[Candidates], max_queue: int) -> list[Candidates]:
    admitted = []
    for group in groups:
        decode = tuple(d for d in group.decode if queued(d) < max_queue)
        if decode:
            admitted.append(Candidates(group.layout, group.prefill, decode))
    return admitted


def _refuse(query: RouteQuery, groups: list[Candidates], max_queue: int) -> CapacityError:
    n = len(query.prompt_token_ids)
    shortest = min(queued(d) for g in groups for d in g.decode)
    retry = min(drain_s(g, d, n, queued(d) - max_queue + 1) for g in groups for d in g.decode)
    return CapacityError(f"every decode worker has {max_queue} or more requests queued ({shortest} at the "
                         f"shortest, counting those routed since its last heartbeat); retry later",
                         retry_after_s=max(retry, MIN_RETRY_AFTER_S))


def route(query: RouteQuery, workers: Sequence[Worker], policy: Policy, max_queue: int) -> RoutePlan:
    """Pick a (prefill, decode) pair with equal layouts for query (or a colocated decode worker alone), and decide
    whether the decode worker prefills the prompt itself (the plan carries it; the worker obeys).

    InvalidArgumentError for an empty prompt, UnavailableError when no compatible pair is registered,
    CapacityError (with a retry-after from the predicted queue drain) when every compatible decode worker has
    max_queue or more requests queued, counting those routed since its last heartbeat, or when the policy finds
    no route that meets the request's objectives.
    """
    if not query.prompt_token_ids:
        raise InvalidArgumentError("prompt_token_ids must not be empty")
    if min(query.prompt_token_ids) < 0:
        raise InvalidArgumentError("prompt_token_ids must be non-negative")
    groups = group_by_layout(query, _avoiding(query, workers))
    if not groups:
        wanted = f"model {query.model!r}" if query.model else "any model"
        raise UnavailableError(f"no prefill and decode worker pair with equal KV layouts (nor a colocated worker) is "
                               f"registered for {wanted} "
                               f"({len(workers)} workers live)")
    admitted = _admit(groups, max_queue)
    if not admitted:
        raise _refuse(query, groups, max_queue)
    plan = policy(query, admitted)
    if plan.decode.spec.colocated:
        return dataclasses.replace(plan, local_prefill=True)
    if plan.kv_source:  # the policy decided where the KV comes from, local prefill included
        return plan
    local = decode_prefills(len(query.prompt_token_ids), plan.num_decode_cached_tokens, plan.decode)
    return dataclasses.replace(plan, local_prefill=local)
