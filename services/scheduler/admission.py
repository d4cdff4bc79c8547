"""Admission control: whether a decode worker can take one more request now, counting what its last heartbeat
showed and what was routed to it since. Two limits: its queue (requests waiting, `--max-queue`) and its KV pool
(the blocks every request it holds will take at most: prompt + max_tokens each). A request no decode worker can
take is refused at once with RESOURCE_EXHAUSTED and a retry-after from the predicted drain, never left to wait on
a worker for blocks to free up. The queue limit depends on the request's priority (lower is more urgent, as
vLLM's): `--max-queue-per-priority` caps less urgent requests lower, so at the same load a less urgent request is
refused while a more urgent one is still admitted (queue room kept for it)."""

from __future__ import annotations

from dataclasses import dataclass

from kvmesh.services.common.errors import CapacityError, InvalidArgumentError
from kvmesh.services.scheduler import predict
from kvmesh.services.scheduler.registry import Worker
from kvmesh.services.scheduler.route_types import Candidates, RouteQuery

#: The least retry-after hint of an admission refusal (seconds; the client sees whole seconds, at least 1).
MIN_RETRY_AFTER_S = 0.05


@dataclass(frozen=True)
class QueueLimits:
    """Queue limits per priority: `max_queue` for every request, and `(priority, limit)` caps, each applying to
    requests of that priority or a less urgent one (a higher number)."""

    max_queue: int
    per_priority: tuple[tuple[int, int], ...] = ()

    @classmethod
    def of(cls, limits: "int | QueueLimits") -> "QueueLimits":
        return limits if isinstance(limits, QueueLimits) else cls(limits)

    def for_priority(self, priority: int) -> int:
        """The most requests a decode worker may have queued for one more of this priority to be admitted."""
        caps = [limit for floor, limit in self.per_priority if priority >= floor]
        return min([self.max_queue, *caps])


def parse_priority_limits(spec: str) -> tuple[tuple[int, int], ...]:
    """`"1:16,10:4"` → ((1, 16), (10, 4)): requests of priority >= 1 are admitted while fewer than 16 are queued,
    those of priority >= 10 while fewer than 4. ValueError naming the bad entry."""
    limits = []
    for entry in filter(None, (e.strip() for e in spec.split(","))):
        floor, sep, limit = entry.partition(":")
        try:
            pair = (int(floor), int(limit))
        except ValueError:
            pair = None
        if not sep or pair is None or pair[1] < 0:
            raise ValueError(f"max_queue_per_priority entry {entry!r} is not PRIORITY:LIMIT (integers, LIMIT >= 0), "
                             f"e.g. '1:16,10:4'")
        limits.append(pair)
    return tuple(sorted(limits))


class PoolFullError(CapacityError):
    """No decode worker's KV pool has room for the request's blocks (reason `kv_blocks` in the rejection metric)."""


def queued(decode: Worker) -> int:
    """Requests a decode worker has queued: those waiting at its last heartbeat (a colocated worker's prompts not
    yet computed too) plus those the scheduler routed to it since, which no heartbeat shows yet."""
    pending = decode.load.num_pending_prefill if decode.spec.colocated else 0
    return decode.load.num_waiting + pending + decode.num_routed


def blocks_needed(query: RouteQuery, decode: Worker) -> int:
    """KV blocks the request will hold at most on the decode worker: its prompt plus max_tokens, in blocks; on a
    worker that spills KV to the cache, its prompt and first token (the rest it can borrow)."""
    more = 1 if decode.spec.spills_kv else query.max_tokens
    return decode.spec.layout.num_blocks_for(len(query.prompt_token_ids) + more)


def free_blocks(decode: Worker) -> int | None:
    """Blocks of the decode worker's pool that no request it holds or was routed will take; None when it reports
    no pool (nothing to count)."""
    load = decode.load
    if not load.num_total_blocks:
        return None
    return load.num_total_blocks - load.num_blocks_claimed - decode.num_routed_blocks


def fits(query: RouteQuery, decode: Worker) -> bool:
    """Whether the decode worker's pool can hold the request beside everything it holds or was routed."""
    free = free_blocks(decode)
    return free is None or blocks_needed(query, decode) <= free


def drain_s(group: Candidates, decode: Worker, num_prompt_tokens: int, num_requests: int) -> float:
    """Predicted seconds until num_requests prompts like this one have left the decode worker's queue: computed
    by its own engine (colocated) or by the group's prefill workers in parallel."""
    if not group.prefill:
        return num_requests * predict.compute_s(decode, 0, num_prompt_tokens)
    fastest = min(predict.compute_s(p, 0, num_prompt_tokens) for p in group.prefill)
    return num_requests * fastest / len(group.prefill)


def admit(query: RouteQuery, groups: list[Candidates], limits: int | QueueLimits) -> list[Candidates]:
    """The groups with only the decode workers that can take the request now (groups left with none dropped):
    fewer queued than the request's priority allows, and room in the pool. CapacityError (or InvalidArgumentError
    for a request larger than every pool) when none can."""
    limits = QueueLimits.of(limits)
    max_queue = limits.for_priority(query.priority)
    admitted = []
    for group in groups:
        decode = tuple(d for d in group.decode if queued(d) < max_queue and fits(query, d))
        if decode:
            admitted.append(Candidates(group.layout, group.prefill, decode))
    if not admitted:
        raise refusal(query, groups, max_queue, max_queue < limits.max_queue)
    return admitted


def refusal(query: RouteQuery, groups: list[Candidates], max_queue: int, capped: bool = False) -> Exception:
    """Why no decode worker can take the request: every queue full, or no pool with room for its blocks."""
    decodes = [(g, d) for g in groups for d in g.decode]
    n = len(query.prompt_token_ids)
    roomy = [(g, d) for g, d in decodes if queued(d) < max_queue]
    if not roomy:
        shortest = min(queued(d) for _, d in decodes)
        retry = min(drain_s(g, d, n, queued(d) - max_queue + 1) for g, d in decodes)
        cap = (f" (the limit for priority {query.priority}; more urgent requests are still admitted)" if capped
               else "")
        return CapacityError(f"every decode worker has {max_queue} or more requests queued{cap} ({shortest} at the "
                             f"shortest, counting those routed since its last heartbeat); retry later",
                             retry_after_s=max(retry, MIN_RETRY_AFTER_S))
    need = max(blocks_needed(query, d) for _, d in roomy)
    largest = max(d.load.num_total_blocks for _, d in roomy)
    if need > largest:
        return InvalidArgumentError(f"the prompt ({n} tokens) plus max_tokens ({query.max_tokens}) needs {need} KV "
                                    f"blocks; the largest decode worker's pool holds {largest}: shorten the prompt "
                                    f"or lower max_tokens")
    most = max(free_blocks(d) for _, d in roomy)
    # a request in the batch gives its blocks back when it finishes: on average after half of max_tokens steps
    retry = min(predict.step_s(d) for _, d in roomy) * max(query.max_tokens, 1) / 2
    return PoolFullError(f"no decode worker has room for the request's {need} KV blocks (prompt {n} + max_tokens "
                         f"{query.max_tokens}): {max(most, 0)} at the most are not taken by the requests it holds "
                         f"and those routed since its last heartbeat; retry later",
                         retry_after_s=max(retry, MIN_RETRY_AFTER_S))
