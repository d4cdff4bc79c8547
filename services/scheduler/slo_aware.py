"""The slo_aware policy: one joint choice of (prefill worker, decode worker, KV source) by predicted TTFT, within
the request's TPOT (and TTFT) objectives, from each worker's fitted cost models (predict.py).

KV sources: recompute the prompt; fetch the cache's leading blocks (DRAM or SSD tier) and compute the rest — only
where predicted cheaper than recomputing; and the decode worker's own pool, which spares the handoff of the tokens
it holds. Conditional disaggregation: the decode worker prefills the prompt itself (chunks interleaved with its
decode steps) when the uncached part is short, or when the prefill queues cost more than computing it there and
its batch's TPOT stays within the objective. Routing cost grows with prefill + decode workers, not their product:
a prompt's cost on a prefill worker does not depend on the decode worker, so each group's best prefill worker is
found once.
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence

from kvmesh.services.common.errors import CapacityError
from kvmesh.services.scheduler import peers, predict
from kvmesh.services.scheduler.registry import Worker
from kvmesh.services.scheduler.route_types import (CACHE, DECODE_POOL, LOCAL, PEER, RECOMPUTE, Candidates,
                                                   Prediction, RoutePlan, RouteQuery)

TRACE_CANDIDATES = 8  # predictions carried in the plan (and the route span): the best few
MIN_RETRY_AFTER_S = 0.05


def best_prefill(query: RouteQuery, group: Candidates) -> tuple[float, float, Worker, str, str] | None:
    """(wait + compute seconds, wait seconds, prefill worker, KV source, why) of the group's best prefill worker
    for the prompt: the cache's prefix, or the one a decode worker's pool holds (peer pull), is fetched only where
    that beats recomputing it on that worker."""
    n, layout, links = len(query.prompt_token_ids), group.layout, query.links
    hit = query.cached_tokens.get(layout, 0)
    ssd = min(query.cached_ssd_tokens.get(layout, 0), hit)
    holders: dict = {}  # by prefill layout (block sizes may differ within a group): the best peer, once each
    best = None
    for prefill in group.prefill:
        fetch = predict.fetch_s(links, layout, hit - ssd, ssd, prefill) if hit else 0.0  # its own fetch link
        wait = predict.prefill_backlog_s(prefill, n)
        recompute = predict.compute_s(prefill, 0, n)
        cost, source = recompute, RECOMPUTE
        if hit and fetch + predict.compute_s(prefill, hit, n - hit) < recompute:
            cost, source = fetch + predict.compute_s(prefill, hit, n - hit), CACHE
        own = prefill.spec.layout
        peer, held = holders[own] if own in holders else holders.setdefault(own, peers.best(query, own))
        if held > hit and peers.reaches(peer, prefill):  # the peer's blocks move like a handoff, the other way
            pull = predict.transfer_s(links, layout, held, peer, prefill) + predict.compute_s(prefill, held, n - held)
            if pull < cost:
                cost, source = pull, PEER
        if best is None or wait + cost < best[0]:
            best = (wait + cost, wait, prefill, source, recompute, peer, held)
    if best is None:
        return None
    total, wait, prefill, source, recompute, peer, held = best
    if source == PEER:
        why = (f"pull {held} tokens from decode worker {peer.worker_id}'s pool + compute the rest "
               f"{total - wait:.4f}s < recompute {recompute:.4f}s")
    elif not hit:
        why = "nothing cached"
    elif source == CACHE:
        why = f"fetch {hit} tokens ({ssd} from SSD) + compute the rest {total - wait:.4f}s < recompute {recompute:.4f}s"
    else:
        why = f"recompute {recompute:.4f}s <= fetch {hit} tokens ({ssd} from SSD) + compute the rest"
    return total, wait, prefill, source, why


def _local_compute_s(query: RouteQuery, decode: Worker, held: int, remote: Worker | None, batch: int,
                     queue_s: float) -> float | None:
    """Seconds the decode worker would take to prefill the part of the prompt it lacks, when it may: it is
    colocated, or that part is short, or the backlog the best prefill worker reported (`queue_s`: a reported queue,
    not requests routed since, which may be done already) takes longer and the request has a TPOT objective, which
    bounds what the worker's batch may suffer (checked on the prediction). None when it may not. Without an
    objective nothing measures that headroom, and a decode worker busy prefilling long prompts starves its own
    event loop on a small machine: it prefills only the short tails. A worker registered with a local-prefill
    limit of 0 never prefills for a prefill worker's queue."""
    n = len(query.prompt_token_ids)
    if remote is None or predict.decode_prefills(n, held, decode):
        return predict.compute_s(decode, held, n - held, remote)
    if decode.spec.local_prefill_max_tokens == 0 or not queue_s or not query.slo_tpot_s:
        return None
    seconds = predict.compute_s(decode, held, n - held, remote)
    return seconds if queue_s > seconds else None


def predictions(query: RouteQuery, groups: Sequence[Candidates]) -> tuple[list[Prediction], dict]:
    """Every candidate route's prediction (one per decode worker and way of prefilling), and why each remote
    route's KV source was chosen (by prefill worker id)."""
    n, out, why = len(query.prompt_token_ids), [], {}
    for group in groups:
        remote = best_prefill(query, group)
        like = remote[2] if remote is not None else None
        if like is not None:
            why[like.worker_id] = remote[4]
        queue_s = predict.prefill_backlog_s(like, n, routed=False) if like is not None else 0.0
        chunk = min(n, predict.LOCAL_CHUNK_TOKENS)
        num_output = predict.output_estimate(query.max_tokens, group.decode)
        for decode in group.decode:
            held = query.decode_cached_tokens.get(decode.worker_id, 0)
            batch, context = predict.decode_batch(decode)
            model = decode.fit.decode
            step = model.seconds(batch, context) if batch else 0.0
            tpot = predict.lifetime_tpot_s(decode, batch, context, n, num_output)  # its batch computed once
            if remote is not None:
                total, wait, prefill, source, _ = remote
                transfer = predict.transfer_s(query.links, group.layout, n - held, prefill, decode)
                out.append(Prediction(prefill, decode, source, total + transfer + step, tpot, wait))
            local = _local_compute_s(query, decode, held, like, batch, queue_s)
            if local is not None:
                wait = predict.local_backlog_s(decode)
                tpot_local = tpot + predict.compute_s(decode, 0, min(n - held, chunk), like)
                out.append(Prediction(like, decode, DECODE_POOL if held else LOCAL, wait + local + step,
                                      tpot_local, wait))
    return out, why


def _meets(query: RouteQuery, p: Prediction) -> bool:
    return ((not query.slo_ttft_s or p.ttft_s <= query.slo_ttft_s)
            and (not query.slo_tpot_s or p.tpot_s <= query.slo_tpot_s))


def _refuse(query: RouteQuery, every: list[Prediction]) -> CapacityError:
    """No route meets the objectives: refuse now, with the predicted wait until the best one would."""
    best = min(every, key=lambda p: p.ttft_s)
    retry = min((p.ttft_s - query.slo_ttft_s if query.slo_ttft_s and p.ttft_s > query.slo_ttft_s else p.wait_s)
                for p in every)
    return CapacityError(f"no route is predicted to meet the objectives (TTFT {query.slo_ttft_s or '-'} s, TPOT "
                         f"{query.slo_tpot_s or '-'} s): best predicted TTFT {best.ttft_s:.3f} s, TPOT "
                         f"{min(p.tpot_s for p in every):.3f} s; retry later or relax the objectives",
                         retry_after_s=max(retry, MIN_RETRY_AFTER_S))


def check_objectives(query: RouteQuery, groups: Sequence[Candidates], plan: RoutePlan) -> None:
    """Early rejection for a policy that predicts nothing (least_loaded, kv_aware, round_robin, power_of_two):
    CapacityError with a retry-after (the predicted wait beyond the objective) when the chosen route's predicted
    TTFT or TPOT already misses the request's objectives, rather than serving it late. A plan with predictions
    (slo_aware) was checked when it was made; a request without objectives is not checked."""
    if plan.predicted_ttft_s or not (query.slo_ttft_s or query.slo_tpot_s):
        return
    group = next(g for g in groups if plan.decode in g.decode)
    only = Candidates(group.layout, (plan.prefill,) if plan.prefill is not None else (), (plan.decode,))
    every, _ = predictions(query, [only])
    chosen = [p for p in every if (p.kv_source in (LOCAL, DECODE_POOL)) == plan.local_prefill] or every
    if chosen and not any(_meets(query, p) for p in chosen):
        raise _refuse(query, chosen)


def check_floors(query: RouteQuery, groups: Sequence[Candidates]) -> None:
    """Early rejection before the cache is asked: CapacityError when no route could meet the request's objectives
    whatever the cache holds. Each route's TTFT is at least its queue wait (the least of its group's prefill
    workers', or the decode worker's own when it prefills) plus the decode worker's next step, since computing,
    fetching and handing off cost no less than nothing (the fits are non-negative); its TPOT does not depend on
    the cache. So a request this refuses, every policy would refuse after the probe too."""
    if not (query.slo_ttft_s or query.slo_tpot_s):
        return
    n, floors = len(query.prompt_token_ids), []
    for group in groups:
        remote = min((predict.prefill_backlog_s(p, n) for p in group.prefill), default=None)
        num_output = predict.output_estimate(query.max_tokens, group.decode)
        for decode in group.decode:
            local = predict.local_backlog_s(decode)
            wait = local if remote is None else min(remote, local)
            batch, context = predict.decode_batch(decode)
            tpot = predict.lifetime_tpot_s(decode, batch, context, n, num_output)
            floors.append(Prediction(None, decode, "", wait + predict.step_s(decode), tpot, wait))
    if floors and not any(_meets(query, p) for p in floors):
        best = _refuse(query, floors)
        raise CapacityError(f"no route is predicted to meet the objectives (TTFT {query.slo_ttft_s or '-'} s, TPOT "
                            f"{query.slo_tpot_s or '-'} s) whatever the cache holds: TTFT at least "
                            f"{min(p.ttft_s for p in floors):.3f} s behind the queues, TPOT at least "
                            f"{min(p.tpot_s for p in floors):.3f} s; retry later or relax the objectives",
                            retry_after_s=best.retry_after_s)


def slo_aware(query: RouteQuery, groups: Sequence[Candidates]) -> RoutePlan:
    """The route with the least predicted TTFT among those whose predicted TTFT and TPOT meet the request's
    objectives (ties: the lower TPOT); CapacityError with a retry-after when none does."""
    every, why = predictions(query, groups)
    feasible = [p for p in every if _meets(query, p)]
    if not feasible:
        raise _refuse(query, every)
    chosen = min(feasible, key=lambda p: (p.ttft_s, p.tpot_s))
    local = chosen.kv_source in (LOCAL, DECODE_POOL)
    layout = chosen.decode.spec.layout
    reason = (f"decode worker prefills itself: predicted {chosen.ttft_s:.4f}s" if local
              else f"{why.get(chosen.prefill.worker_id, '')}; "
                   f"{predict.link_note(query.links, chosen.prefill, chosen.decode)}")
    peer, held = peers.best(query, chosen.prefill.spec.layout) if chosen.kv_source == PEER else (None, 0)
    fetched = held if peer is not None else query.cached_tokens.get(layout, 0) if chosen.kv_source == CACHE else 0
    return RoutePlan(None if chosen.decode.spec.colocated else chosen.prefill, chosen.decode, fetched,
                     policy="slo_aware", kv_peer=peer,
                     num_decode_cached_tokens=query.decode_cached_tokens.get(chosen.decode.worker_id, 0),
                     local_prefill=local, kv_source=chosen.kv_source, why=reason,
                     predicted_ttft_s=chosen.ttft_s, predicted_tpot_s=chosen.tpot_s,
                     candidates=tuple(heapq.nsmallest(TRACE_CANDIDATES, every, key=lambda p: p.ttft_s)))
