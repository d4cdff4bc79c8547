"""Predictions from each worker's fitted cost models (models.py) and the KV links: how long a worker's queue
takes to drain, what a prompt costs to compute or fetch, how long its KV takes to reach the decode worker, and a
decode worker's time per output token with one more request in its batch. Pure functions of worker state."""

from __future__ import annotations

import functools

from kvmesh.services.cost_model import PrefillModel
from kvmesh.services.kv_identity import KVLayout, prefill_locally
from kvmesh.services.scheduler.registry import Worker
from kvmesh.services.scheduler.route_types import Links

_DTYPE_BYTES = {"float32": 4, "float64": 8, "float16": 2, "bfloat16": 2, "float8_e4m3fn": 1, "float8_e5m2": 1}
#: Prompt tokens per engine step when a decode worker prefills a prompt itself (chunks interleaved with decode
#: steps): what one step of its batch grows by meanwhile.
LOCAL_CHUNK_TOKENS = 256
#: The decode worker's --local-prefill-max-tokens default, for workers that registered none.
LOCAL_PREFILL_MAX_TOKENS = 16


@functools.lru_cache(maxsize=64)  # a handful of layouts, asked once per candidate of every route
def kv_bytes_per_token(layout: KVLayout) -> int:
    """Bytes of K and V per token across every layer."""
    return 2 * layout.num_layers * layout.num_kv_heads * layout.head_dim * _DTYPE_BYTES.get(layout.dtype, 2)


def prefill_backlog_s(worker: Worker, num_prompt_tokens: int, routed: bool = True) -> float:
    """Seconds until `worker` has computed every prompt ahead of a new one: the backlog its heartbeat reported
    (its prompts not yet computed, from a worker that reports its steps; else each request it holds priced as half
    a prompt like this one) plus, when `routed`, what was routed to it since."""
    fit, load = worker.fit.prefill, worker.load
    if worker.fit.num_samples or load.num_pending_prefill_tokens:
        seconds = queue_s(fit, load.num_pending_prefill, load.num_pending_prefill_tokens)
    else:
        seconds = (load.num_waiting + load.num_running) * (fit.a + fit.chunk_cost(0, num_prompt_tokens) / 2)
    if routed:
        seconds += queue_s(fit, worker.num_routed, worker.num_routed_tokens)
    return seconds


def queue_s(fit: PrefillModel, num_prompts: int, num_tokens: int) -> float:
    """Seconds to compute `num_prompts` prompts of `num_tokens` in all, their attention (quadratic) part priced as
    if they were equally long: exact then, a lower bound otherwise. Without it a fit whose cost sits in that part
    (prompts of one length make tokens and pairs collinear) priced a queue of 256-token prompts at 25 ms each
    instead of 650, and admitted a burst 30x past its TTFT objective."""
    seconds = fit.a * max(num_prompts, 0)
    if num_tokens > 0:  # a load that reports tokens but no count: one prompt (the lower bound)
        seconds += fit.b * num_tokens + fit.c * num_tokens * num_tokens / max(num_prompts, 1)
    return seconds


def local_backlog_s(decode: Worker) -> float:
    """Seconds until a decode worker has computed the prompts it prefills itself (colocated: every prompt routed
    to it since its heartbeat too)."""
    fit, load = decode.fit.prefill, decode.load
    seconds = queue_s(fit, load.num_pending_prefill, load.num_pending_prefill_tokens)
    if decode.spec.colocated:
        seconds += queue_s(fit, decode.num_routed, decode.num_routed_tokens)
    return seconds


def compute_s(worker: Worker, done: int, num_tokens: int, like: Worker | None = None) -> float:
    """Seconds for worker to compute num_tokens of a prompt after its first `done` (0 when nothing is left). A
    worker that never prefilled (a decode worker) is priced like `like` (a prefill worker of the same layout and
    model) when given, rather than by the prior."""
    fit = worker.fit.prefill
    if like is not None and not worker.fit.prefill_fitted and like.fit.prefill_fitted:
        fit = like.fit.prefill
    return fit.a + fit.chunk_cost(done, num_tokens) if num_tokens > 0 else 0.0


def receiver_address(worker: Worker) -> str:
    """The address a worker's KV arrives at (its transport descriptor's; else its service address): how the
    senders' reports name it."""
    descriptor = worker.spec.descriptor
    return getattr(descriptor, "address", "") or worker.spec.address


def fetch_s(links: Links, layout: KVLayout, num_dram_tokens: int, num_ssd_tokens: int,
            requester: Worker | None = None) -> float:
    """Seconds to fetch cached KV from the cache service's tiers into `requester` (its fitted fetch model where
    the scheduler has one, else the priors)."""
    if num_dram_tokens + num_ssd_tokens <= 0:
        return 0.0
    per_token = kv_bytes_per_token(layout)
    if links.book is not None and requester is not None:
        fit = links.book.fetch(receiver_address(requester))
        return fit.seconds((num_dram_tokens + num_ssd_tokens) * per_token, num_ssd_tokens * per_token)
    gb = per_token / 1e9
    return links.fixed_s + gb * (num_dram_tokens / links.dram_gbps + num_ssd_tokens / links.ssd_gbps)


def transfer_s(links: Links, layout: KVLayout, num_tokens: int, prefill: Worker | None = None,
               decode: Worker | None = None) -> float:
    """Seconds to hand num_tokens tokens' KV from a prefill worker to a decode worker (that pair's fitted link
    model where the scheduler has one, else the priors)."""
    if num_tokens <= 0:
        return 0.0
    if links.book is not None and prefill is not None and decode is not None:
        fit = links.book.transfer(prefill.worker_id, receiver_address(decode))
        return fit.seconds(num_tokens * kv_bytes_per_token(layout))
    return links.fixed_s + num_tokens * kv_bytes_per_token(layout) / (links.transfer_gbps * 1e9)


def link_note(links: Links, prefill: Worker, decode: Worker) -> str:
    """Which handoff speed the pair's predictions used, for the route span."""
    if links.book is None:
        return f"handoff prior {links.transfer_gbps:.3g} GB/s + {links.fixed_s * 1e3:.3g} ms"
    fit = links.book.transfer(prefill.worker_id, receiver_address(decode))
    return (f"handoff {'fitted' if fit.fitted else 'prior'} {fit.gbps:.3g} GB/s + {fit.fixed_s * 1e3:.3g} ms "
            f"({fit.num_samples} samples)")


def decode_batch(decode: Worker) -> tuple[int, int]:
    """(sequences, context tokens) the decode worker's batch will hold: its reported requests plus those routed
    since, and the KV its pool holds (its used blocks)."""
    load = decode.load
    batch = load.num_waiting + load.num_running + decode.num_routed
    context = 0
    if load.num_total_blocks and decode.spec.layout is not None:
        context = (load.num_total_blocks - load.num_free_blocks) * decode.spec.layout.block_size
    return batch, context + decode.num_routed_tokens


def output_estimate(max_tokens: int, decodes: "tuple[Worker, ...] | list[Worker]") -> int:
    """Tokens a new request is expected to generate: its max_tokens, capped by the workload's mean observed output
    length (the mean of what the decode workers report; none reported: max_tokens alone). At least 1."""
    means = [d.load.mean_output_tokens for d in decodes if d.load.mean_output_tokens > 0]
    mean = sum(means) / len(means) if means else 0.0
    if mean and max_tokens:
        return max(1, min(max_tokens, round(mean)))
    return max(1, max_tokens or round(mean))


def lifetime_tpot_s(decode: Worker, batch: int, context: int, num_prompt_tokens: int, num_output: int) -> float:
    """Mean seconds per output token over the new request's expected life (`num_output` steps) on the decode
    worker, whose batch holds `batch` sequences over `context` tokens (TetriInfer's length-aware placement): each
    held sequence stays in the batch only while it still has tokens to generate (its reported remaining tokens;
    those routed since its heartbeat expected to last as long as this one), and every sequence's context grows a
    token per step. The step model is linear, so the mean step is the step at the mean batch and context."""
    if not batch:
        return decode.fit.decode.seconds(1, num_prompt_tokens + num_output / 2)
    span = batch * num_output  # sequence-steps the held batch would fill if none finished first
    remaining = decode.load.num_remaining_tokens + decode.num_routed * num_output
    held = min(remaining, span) / span if decode.load.num_remaining_tokens else 1.0  # unreported: all stay
    mean_batch = 1 + batch * held
    mean_context = num_prompt_tokens + num_output / 2 + context * held + batch * held * held * num_output / 2
    return decode.fit.decode.seconds(mean_batch, mean_context)


def step_s(decode: Worker) -> float:
    """Seconds of the decode worker's next step (a landed prompt joins the batch at a step's end)."""
    batch, context = decode_batch(decode)
    return decode.fit.decode.seconds(batch, context) if batch else 0.0


def tpot_s(decode: Worker, num_prompt_tokens: int, local_tokens: int = 0, like: Worker | None = None,
           num_output: int = 1) -> float:
    """Seconds per output token on the decode worker with this request in its batch, over its expected life of
    `num_output` tokens (lifetime_tpot_s); while it prefills local_tokens itself, each step also carries a chunk
    of them (priced as compute_s prices them)."""
    batch, context = decode_batch(decode)
    seconds = lifetime_tpot_s(decode, batch, context, num_prompt_tokens, num_output)
    if local_tokens > 0:
        seconds += compute_s(decode, 0, min(local_tokens, LOCAL_CHUNK_TOKENS), like)
    return seconds


def decode_prefills(num_prompt_tokens: int, num_decode_cached_tokens: int, decode: Worker) -> bool:
    """Whether the decode worker holding `num_decode_cached_tokens` of the prompt prefills it itself
    (`kv_identity.prefill_locally` with the worker's registered limit: its own rule for plans that do not say)."""
    if decode.spec.colocated:
        return True
    limit = decode.spec.local_prefill_max_tokens
    return prefill_locally(num_prompt_tokens, num_decode_cached_tokens, decode.spec.layout.block_size,
                           LOCAL_PREFILL_MAX_TOKENS if limit is None else limit)
