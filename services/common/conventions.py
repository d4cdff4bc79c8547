"""Span names, attribute names and TTFT phases shared by the services (who write them) and `kvmesh trace`."""

from __future__ import annotations

REQUEST_SPAN = "gateway.Generate"
SCHEDULER_ROUTE = "scheduler.route"
PLANNER_DECIDE = "planner.decide"  # one round of the scheduler's planner loop, its predicted figures as attributes
DECODE_ADMIT = "decode.admit"
DECODE_QUEUE = "decode.queue"
PREFILL_QUEUE = "prefill.queue"
PREFILL_COMPUTE = "prefill.compute"
KV_TRANSFER = "kv.transfer"
CACHE_LOOKUP = "cache.lookup"
CACHE_GET = "cache.get"
CACHE_PUT = "cache.put"
DECODE_STREAM = "decode.stream"
WORKER_ROLE_FLIP = "worker.role_flip"  # a flexible worker drains one role and registers in another
DECODE_WAIT_KV = "decode.wait_kv"  # the prefill call and the KV landing; no phase of its own (its children have)

ATTR_REQUEST_ID = "kvmesh.request_id"
ATTR_TTFT_S = "kvmesh.ttft_s"
ATTR_PHASE = "kvmesh.phase"
ATTR_PROMPT_TOKENS = "kvmesh.prompt_tokens"
ATTR_OUTPUT_TOKENS = "kvmesh.output_tokens"
ATTR_MEAN_ITL_S = "kvmesh.mean_itl_s"
ATTR_E2E_S = "kvmesh.e2e_s"
ATTR_PREFILL_TOKENS = "kvmesh.prefill.tokens"
ATTR_CACHED_TOKENS = "kvmesh.cached_tokens"
ATTR_ROUTE_PREFILL = "kvmesh.route.prefill"
ATTR_ROUTE_DECODE = "kvmesh.route.decode"
ATTR_ROUTE_REASON = "kvmesh.route.reason"
ATTR_ROUTE_LOCAL_PREFILL = "kvmesh.route.local_prefill"  # the decode worker prefills (no prefill hop, no transfer)
ATTR_KV_BYTES = "kvmesh.kv.bytes"
ATTR_KV_BLOCKS = "kvmesh.kv.blocks"
ATTR_KV_BACKEND = "kvmesh.kv.backend"
ATTR_KV_GBPS = "kvmesh.kv.gbps"
ATTR_KV_LAYER = "kvmesh.kv.layer"
ATTR_KV_DIRECTION = "kvmesh.kv.direction"
ATTR_KV_LAYERS = "kvmesh.kv.layers"
ATTR_KV_CHECKSUM_S = "kvmesh.kv.checksum_s"
ATTR_CACHE_HIT_BLOCKS = "kvmesh.cache.hit_blocks"
ATTR_CACHE_TIER = "kvmesh.cache.tier"
ATTR_DECODE_HIT_BLOCKS = "kvmesh.cache.decode_hit_blocks"  # prompt blocks the decode worker's own pool held
ATTR_ROLE_FROM = "kvmesh.role.from"
ATTR_ROLE_TO = "kvmesh.role.to"
ATTR_DECODE_CACHED_TOKENS = "kvmesh.route.decode_cached_tokens"  # the scheduler's view of that hit, in tokens

EVENT_FIRST_TOKEN = "first_token"
EVENT_PLACED_AGAIN = "placed_again"  # the gateway routes a failed request again, or migrates it mid-stream

# Highest priority first: an instant covered by several phases goes to the first of them.
PHASES = ("prefill", "transfer", "cache", "queue")
OTHER = "other"

PHASE_OF_SPAN = {
    SCHEDULER_ROUTE: "queue",
    DECODE_ADMIT: "queue",
    DECODE_QUEUE: "queue",
    PREFILL_QUEUE: "queue",
    PREFILL_COMPUTE: "prefill",
    KV_TRANSFER: "transfer",
    CACHE_LOOKUP: "cache",
    CACHE_GET: "cache",
    CACHE_PUT: "cache",
}
