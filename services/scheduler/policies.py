"""Routing policies: pure functions that pick a (prefill, decode) pair from groups of compatible workers.

The router (router.py) does the shared work once — filter by model and layout, group by layout, apply admission
control — and hands a policy only groups in which every prefill worker may pair with every decode worker. A new
policy is one function here and one line in POLICIES.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from kvmesh.services.scheduler.registry import Layout, Worker


@dataclass(frozen=True)
class RouteQuery:
    """One request as the policies see it."""

    request_id: str
    prompt_token_ids: tuple[int, ...]
    model: str = ""
    layout: Layout | None = None
    cache_salt: str | None = None


@dataclass(frozen=True)
class Candidates:
    """Workers sharing one KV layout: any prefill here may write into any decode here."""

    layout: Layout
    prefill: tuple[Worker, ...]
    decode: tuple[Worker, ...]


@dataclass(frozen=True)
class RoutePlan:
    """The decision: where to prefill, where to decode, how many prompt tokens the cache already holds."""

    prefill: Worker
    decode: Worker
    num_cached_tokens: int
    policy: str


Policy = Callable[[RouteQuery, Sequence[Candidates]], RoutePlan]


def load_score(worker: Worker) -> float:
    """How busy a worker is: queued plus running requests, plus the used fraction of its KV pool."""
    load = worker.load
    used = 0.0
    if load.num_total_blocks > 0:
        used = 1.0 - load.num_free_blocks / load.num_total_blocks
    return load.num_waiting + load.num_running + used


def least_loaded(query: RouteQuery, groups: Sequence[Candidates]) -> RoutePlan:
    """The least loaded decode worker, then the least loaded prefill worker of its layout (ties: first registered)."""
    group, decode = min(((g, d) for g in groups for d in g.decode), key=lambda gd: load_score(gd[1]))
    prefill = min(group.prefill, key=load_score)
    return RoutePlan(prefill, decode, num_cached_tokens=0, policy="least_loaded")


POLICIES: dict[str, Policy] = {
    "least_loaded": least_loaded,
}


def get_policy(name: str) -> Policy:
    """The policy registered under name; KeyError lists the known ones."""
    try:
        return POLICIES[name]
    except KeyError:
        raise KeyError(f"unknown routing policy {name!r}; known: {sorted(POLICIES)}") from None
