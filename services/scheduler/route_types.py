"""What the routing policies read and return: a request (RouteQuery), groups of compatible workers (Candidates),
the decision (RoutePlan) and the predictions behind it (Prediction)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from kvmesh.services.kv_identity import KVLayout
from kvmesh.services.scheduler.registry import Worker

#: Where a prompt's KV comes from.
RECOMPUTE, CACHE, PEER, DECODE_POOL, LOCAL = "recompute", "cache", "peer", "decode_pool", "local"


@dataclass(frozen=True)
class Links:
    """How fast KV moves, for the predictions: the prefill→decode handoff and the cache's two tiers (GB/s), plus
    a fixed cost per move. These are the priors (the scheduler's flags); `book`, when set, holds the models fitted
    from reported transfers per pair and per requester (links.LinkBook), which fall back to these."""

    transfer_gbps: float = 8.0
    dram_gbps: float = 4.0
    ssd_gbps: float = 1.0
    fixed_s: float = 0.002
    book: Any = field(default=None, compare=False, repr=False)  # a links.LinkBook (mutable: fits as they land)


@dataclass(frozen=True)
class RouteQuery:
    """One request as the policies see it."""

    request_id: str
    prompt_token_ids: tuple[int, ...]
    model: str = ""
    layout: KVLayout | None = None
    cache_salt: str | None = None
    # leading prompt tokens the cache holds, per layout (filled by the scheduler's cache probe) ...
    cached_tokens: Mapping[KVLayout, int] = field(default_factory=dict)
    # ... and how many of those only its SSD tier holds
    cached_ssd_tokens: Mapping[KVLayout, int] = field(default_factory=dict)
    # leading prompt tokens each decode worker's own pool holds, by worker id (from its KV events)
    decode_cached_tokens: Mapping[str, int] = field(default_factory=dict)
    # workers this request already failed on (a retry): left out while their role has another candidate
    avoid_worker_ids: frozenset[str] = frozenset()
    # the request's objectives in seconds (0: none): time to first token, time per output token
    slo_ttft_s: float = 0.0
    slo_tpot_s: float = 0.0
    # the most tokens it may generate: with the prompt, the KV blocks it will hold at most (admission counts them)
    max_tokens: int = 0
    links: Links = Links()
    # its priority (lower is more urgent, as vLLM's): admission caps less urgent requests' queues lower
    priority: int = 0
    # decode workers a prefill worker may fetch the prompt's prefix from (peer pull): every live one, whether or
    # not it may take the request itself (a full or avoided worker still serves a fetch)
    peers: tuple[Worker, ...] = ()


@dataclass(frozen=True)
class Candidates:
    """Workers sharing one KV layout: any prefill here may write into any decode here. A group of colocated
    decode workers has no prefill worker."""

    layout: KVLayout
    prefill: tuple[Worker, ...]
    decode: tuple[Worker, ...]


class Prediction(NamedTuple):
    """One candidate route and what the models predict for it: seconds to the first token (of which `wait_s`
    queueing), seconds per output token on its decode worker with this request added. (A named tuple: a
    decision weighs one or two per decode worker, and must stay cheap.)"""

    prefill: Worker | None
    decode: Worker
    kv_source: str
    ttft_s: float
    tpot_s: float
    wait_s: float = 0.0


@dataclass(frozen=True)
class RoutePlan:
    """The decision: where to prefill, where to decode, how many prompt tokens the cache (fetched) and the chosen
    decode worker's own pool already hold, and whether the decode worker prefills the prompt itself. A policy
    that predicts also says where the KV comes from, why, and its predictions (the best few candidates)."""

    prefill: Worker | None  # None: a colocated decode worker, which prefills the prompt itself
    decode: Worker
    num_cached_tokens: int
    policy: str
    num_decode_cached_tokens: int = 0
    local_prefill: bool = False
    kv_source: str = ""  # "": the policy did not decide it (the router applies the decode worker's rule)
    why: str = ""
    predicted_ttft_s: float = 0.0
    predicted_tpot_s: float = 0.0
    candidates: tuple[Prediction, ...] = ()
    kv_peer: Worker | None = None  # kv_source PEER: the decode worker the prefill worker fetches the prefix from


Policy = Callable[[RouteQuery, Sequence[Candidates]], RoutePlan]
