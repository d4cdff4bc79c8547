"""Admission control: whether a decode worker can take one more request now, counting what its last heartbeat
showed and what was routed to it since. Two limits: its queue (requests waiting, `--max-queue`) and its KV pool
(the blocks every request it holds will take at most: prompt + max_tokens each). A request no decode worker can
take is refused at once with RESOURCE_EXHAUSTED and a retry-after from the predicted drain, never left to wait on
a worker for blocks to free up."""

from __future__ import annotations

from kvmesh.services.common.errors import CapacityError, InvalidArgumentError
from kvmesh.services.scheduler import predict
from kvmesh.services.scheduler.registry import Worker
from kvmesh.services.scheduler.route_types import Candidates, RouteQuery

#: The least retry-after hint of an admission refusal (seconds; the client sees whole seconds, at least 1).
MIN_RETRY_AFTER_S = 0.05


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


def admit(query: RouteQuery, groups: list[Candidates], max_queue: int) -> list[Candidates]:
    """The groups with only the decode workers that can take the request now (groups left with none dropped);
    CapacityError (or InvalidArgumentError for a request larger than every pool) when none can."""
    admitted = []
    for group in groups:
        decode = tuple(d for d in group.decode if queued(d) < max_queue and fits(query, d))
        if decode:
            admitted.append(Candidates(group.layout, group.prefill, decode))
    if not admitted:
        raise refusal(query, groups, max_queue)
    return admitted


def refusal(query: RouteQuery, groups: list[Candidates], max_queue: int) -> Exception:
    """Why no decode worker can take the request: every queue full, or no pool with room for its blocks."""
    decodes = [(g, d) for g in groups for d in g.decode]
    n = len(query.prompt_token_ids)
    roomy = [(g, d) for g, d in decodes if queued(d) < max_queue]
    if not roomy:
        shortest = min(queued(d) for _, d in decodes)
        retry = min(drain_s(g, d, n, queued(d) - max_queue + 1) for g, d in decodes)
        return CapacityError(f"every decode worker has {max_queue} or more requests queued ({shortest} at the "
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
