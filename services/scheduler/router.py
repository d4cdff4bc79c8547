"""The routing work shared by every policy: validation, compatibility, admission control."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from kvmesh.services.common.errors import InvalidArgumentError, UnavailableError
from kvmesh.services.scheduler import admission, pairing
from kvmesh.services.scheduler.predict import decode_prefills
from kvmesh.services.scheduler.route_types import Candidates, Policy, RoutePlan, RouteQuery
from kvmesh.services.scheduler.slo_aware import check_objectives
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


def route(query: RouteQuery, workers: Sequence[Worker], policy: Policy,
          max_queue: int | admission.QueueLimits) -> RoutePlan:
    """Pick a (prefill, decode) pair with equal layouts for query (or a colocated decode worker alone), and decide
    whether the decode worker prefills the prompt itself (the plan carries it; the worker obeys).

    InvalidArgumentError for an empty prompt, UnavailableError when no compatible pair is registered (equal
    layouts, and a transport backend both offer and can use between their hosts: pairing.py),
    CapacityError (with a retry-after from the predicted drain) when no compatible decode worker can take the
    request (admission.py: max_queue — or the limit of the request's priority — or more requests queued, or no
    room in its KV pool for the request's prompt plus max_tokens, counting those routed since its last
    heartbeat), or when the policy finds no route that meets the request's objectives.
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
    paired = [g for group in groups for g in pairing.split(group)]
    if not paired:
        raise pairing.unpaired(groups)
    admitted = admission.admit(query, paired, max_queue)
    plan = policy(query, admitted)
    if plan.decode.spec.colocated:
        plan = dataclasses.replace(plan, local_prefill=True)
    elif not plan.kv_source:  # the policy did not decide where the KV comes from: the decode worker's rule
        local = decode_prefills(len(query.prompt_token_ids), plan.num_decode_cached_tokens, plan.decode)
        plan = dataclasses.replace(plan, local_prefill=local)
    check_objectives(query, admitted, plan)  # early rejection, whatever the policy
    return plan
