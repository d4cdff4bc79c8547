"""Every Prometheus metric kvmesh exports, defined once here, named in vLLM's `prefix:name` style.

Services import the metric objects and observe them; nothing else in kvmesh defines a metric. Processes without an
HTTP port of their own serve them with `start_metrics_server(port)`; the gateway mounts `metrics_asgi_app()` (or
answers with `render_latest()`) on its HTTP port. All metrics live in `REGISTRY` (with the process and GC
collectors), not in prometheus_client's global default registry.
"""

from __future__ import annotations

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
    make_asgi_app,
    start_http_server,
)

REGISTRY = CollectorRegistry()
ProcessCollector(registry=REGISTRY)
PlatformCollector(registry=REGISTRY)
GCCollector(registry=REGISTRY)

# Seconds. TTFT spans a loaded CPU prefill (seconds) down to a cache hit (milliseconds).
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0)
TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5)
E2E_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0)
TRANSFER_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)

TIME_TO_FIRST_TOKEN = Histogram(
    "kvmesh:time_to_first_token_seconds",
    "Time from a request's arrival at the gateway to its first generated token.",
    buckets=TTFT_BUCKETS, registry=REGISTRY)
TIME_PER_OUTPUT_TOKEN = Histogram(
    "kvmesh:time_per_output_token_seconds",
    "Per request: (end-to-end latency - TTFT) / (output tokens - 1).",
    buckets=TOKEN_BUCKETS, registry=REGISTRY)
INTER_TOKEN_LATENCY = Histogram(
    "kvmesh:inter_token_latency_seconds",
    "Time between two consecutive tokens streamed for one request.",
    buckets=TOKEN_BUCKETS, registry=REGISTRY)
E2E_REQUEST_LATENCY = Histogram(
    "kvmesh:e2e_request_latency_seconds",
    "Time from a request's arrival to its last token (finished, cancelled or failed).",
    buckets=E2E_BUCKETS, registry=REGISTRY)

REQUEST_RETRIES = Counter(
    "kvmesh:request_retries_total",
    "Requests the gateway placed again after a worker failed them: stage before_first_token (routed again) or "
    "after_first_token (migrated: the prompt and the tokens relayed so far re-issued to another decode worker), "
    "and code (the failure's gRPC status name).",
    ["stage", "code"], registry=REGISTRY)
REQUEST_FAILURES = Counter(
    "kvmesh:request_failures_total",
    "Requests that ended with an error the client saw (client cancels are not counted), by api (rpc: the gRPC Gateway service, or http: the OpenAI API), "
    "stage (before_first_token or after_first_token) and code (the gRPC status name).",
    ["api", "stage", "code"], registry=REGISTRY)

NUM_REQUESTS_WAITING = Gauge(
    "kvmesh:num_requests_waiting",
    "Requests admitted but not yet computing (queued for prefill or for a decode batch slot).",
    registry=REGISTRY)
NUM_REQUESTS_RUNNING = Gauge(
    "kvmesh:num_requests_running",
    "Requests in a running prefill or decode batch.",
    registry=REGISTRY)
KV_BLOCKS_USED = Gauge(
    "kvmesh:kv_blocks_used",
    "Paged KV cache blocks held by requests (reserved, being written or decoding).",
    registry=REGISTRY)
KV_BLOCKS_FREE = Gauge(
    "kvmesh:kv_blocks_free",
    "Paged KV cache blocks free for new requests.",
    registry=REGISTRY)

KV_BLOCKS_CACHED = Gauge(
    "kvmesh:kv_blocks_cached",
    "Paged KV cache blocks findable by prefix hash (held by requests, or cached-free: counted free, evictable).",
    registry=REGISTRY)
KV_LOAD_FAILURES = Counter(
    "kvmesh:kv_load_failures_total",
    "KV transfers into a decode worker that failed or arrived corrupt, by what --kv-load-failure did: fail (the "
    "request failed with the transfer's status, for the gateway to retry) or recompute (prefilled on the decode "
    "worker instead).",
    ["policy"], registry=REGISTRY)
KV_BLOCKS_SPILLED = Counter(
    "kvmesh:kv_blocks_spilled_total",
    "KV blocks a decode worker short of blocks spilled to the cache service (--kv-spill cache) instead of "
    "preempting their sequence.", registry=REGISTRY)
KV_BLOCKS_PAGED_BACK = Counter(
    "kvmesh:kv_blocks_paged_back_total",
    "Spilled KV blocks the cache delivered back into a decode worker's pool; by outcome: paged_back, or recomputed "
    "(lost or undeliverable: the sequence prefilled its tokens again).", ["outcome"], registry=REGISTRY)
KV_SPILL_SECONDS = Histogram(
    "kvmesh:kv_spill_seconds", "Time to put one spill's blocks into the cache service.", registry=REGISTRY)
KV_PAGE_BACK_SECONDS = Histogram(
    "kvmesh:kv_page_back_seconds",
    "Time from a spilled sequence getting blocks again to its KV verified in them.", registry=REGISTRY)
NUM_PREEMPTIONS = Counter(
    "kvmesh:num_preemptions_total",
    "Sequences a worker preempted (blocks freed, recomputed later from their tokens) for lack of KV blocks.",
    registry=REGISTRY)
PREFIX_CACHE_QUERIES = Counter(
    "kvmesh:prefix_cache_queries_total",
    "Prompt tokens looked up in a decode worker's own prefix cache (the prompt's full blocks but its last token).",
    registry=REGISTRY)
SPEC_DECODE_DRAFT_TOKENS = Counter(
    "kvmesh:spec_decode_draft_tokens_total",
    "Draft tokens a decode worker's speculative decoding (--speculative ngram) proposed and verified.",
    registry=REGISTRY)
SPEC_DECODE_ACCEPTED_TOKENS = Counter(
    "kvmesh:spec_decode_accepted_tokens_total",
    "Draft tokens the model agreed with (kept as output); accepted / draft = the acceptance rate.",
    registry=REGISTRY)
PREFIX_CACHE_HITS = Counter(
    "kvmesh:prefix_cache_hits_total",
    "Prompt tokens found in a decode worker's own prefix cache: shared, neither prefilled nor transferred.",
    registry=REGISTRY)

KV_TRANSFER_BYTES = Counter(
    "kvmesh:kv_transfer_bytes_total",
    "KV bytes moved by a transport; direction is send or recv.",
    ["backend", "direction"], registry=REGISTRY)
KV_TRANSFER_SECONDS = Histogram(
    "kvmesh:kv_transfer_seconds",
    "Duration of one KV transfer (one layer or one block batch); direction is send or recv.",
    ["backend", "direction"], buckets=TRANSFER_BUCKETS, registry=REGISTRY)

CACHE_HITS = Counter(
    "kvmesh:cache_hits_total",
    "KV cache blocks found, by the tier (dram or ssd) that held them.",
    ["tier"], registry=REGISTRY)
CACHE_MISSES = Counter(
    "kvmesh:cache_misses_total",
    "KV cache blocks asked for and held by no tier.",
    registry=REGISTRY)
CACHE_OFFERED_BLOCKS = Counter(
    "kvmesh:cache_offered_blocks_total",
    "KV blocks a worker offered the cache after a request (prefill: the prompt's; decode with --cache-decode-kv: "
    "the reply's), by outcome: put (the cache took it), dropped (the offer queue was full), failed (the put "
    "failed or the blocks were gone).",
    ["outcome"], registry=REGISTRY)
CACHE_BYTES = Gauge(
    "kvmesh:cache_bytes",
    "Bytes of KV blocks held, by tier (dram or ssd).",
    ["tier"], registry=REGISTRY)

ROUTE_DECISIONS = Counter(
    "kvmesh:route_decisions_total",
    "Routing decisions by the scheduler, by reason (e.g. cache_affinity, least_loaded, local_prefill).",
    ["reason"], registry=REGISTRY)
ROUTE_REJECTIONS = Counter(
    "kvmesh:route_rejections_total",
    "Requests the scheduler rejected, by reason (no_workers, overloaded, kv_blocks, invalid).",
    ["reason"], registry=REGISTRY)

WORKER_BREAKERS = Gauge(
    "kvmesh:scheduler_worker_breakers",
    "Live workers by the state of their circuit breaker at the scheduler (closed, open, half_open); an open "
    "breaker takes its worker out of routing.",
    ["state"], registry=REGISTRY)
SCHEDULER_COST_MODEL = Gauge(
    "kvmesh:scheduler_cost_model",
    "The scheduler's cost models of each live worker, fitted from its heartbeats' step timings (priors before "
    "enough samples): model prefill (step s = a + b*tokens + c*attention pairs) or decode (a + b*batch + "
    "c*context tokens), coef a, b or c; samples in the fit's window under coef n.",
    ["worker_id", "model", "coef"], registry=REGISTRY)
SCHEDULER_LINK_MODEL = Gauge(
    "kvmesh:scheduler_link_model",
    "The scheduler's KV link models, fitted from the transfers workers report on heartbeats (priors before enough "
    "samples): kind transfer (prefill->decode handoff, per sender, receiver and backend; sender and receiver empty "
    "for a backend's fit across pairs) or fetch (the cache's delivery per requester; empty: across requesters); "
    "seconds = fixed_s + bytes / (gbps * 1e9), a fetch's SSD bytes at ssd_gbps; samples in the window under n.",
    ["kind", "sender_id", "receiver", "backend", "coef"], registry=REGISTRY)
SCHEDULER_UNWATCHED = Counter(
    "kvmesh:scheduler_unwatched_seconds_total",
    "Seconds the scheduler's event loop could not run (a loaded machine, a pause), left out of every worker's "
    "lease so that no worker lapses while its heartbeats wait to be read.",
    registry=REGISTRY)
WORKER_FAILURE_REPORTS = Counter(
    "kvmesh:scheduler_failure_reports_total",
    "Failed calls to a worker reported to the scheduler (feeding its breaker), by the worker's role and the "
    "call's gRPC status.",
    ["role", "code"], registry=REGISTRY)
ROLE_FLIPS = Counter(
    "kvmesh:role_flips_total",
    "Role flips a flexible worker (--role auto) completed: its old role's work drained, registered in the new one.",
    ["from", "to"], registry=REGISTRY)
HANDOFF_LATE = Counter(
    "kvmesh:handoff_late_total",
    "Work that arrived for a request whose KV handoff had already ended (a late transfer or READY), dropped "
    "and its blocks freed; cause is how the handoff ended (expired, failed or released).",
    ["cause"], registry=REGISTRY)

REQUEST_QUEUE_TIME = Histogram(
    "kvmesh:request_queue_time_seconds",
    "Time a request waited on a worker before its work started; stage is decode (waiting for KV blocks) or "
    "prefill (waiting for the engine to start its prefill).",
    ["stage"], buckets=TTFT_BUCKETS, registry=REGISTRY)
REQUEST_PREFILL_TIME = Histogram(
    "kvmesh:request_prefill_time_seconds",
    "Time the prefill engine computed one prompt (the step that completes it) until its first token.",
    buckets=TTFT_BUCKETS, registry=REGISTRY)
ROUTE_SECONDS = Histogram(
    "kvmesh:route_seconds",
    "Time the scheduler took to answer one Route call (decisions and rejections).",
    buckets=TRANSFER_BUCKETS, registry=REGISTRY)
PLANNER_DECISIONS = Counter(
    "kvmesh:planner_decisions_total",
    "Rounds of the scheduler's planner loop, by action: keep, hold (a better split within the hold time), flip, "
    "scale (the scale command ran) or skip (no traffic, no cost model, too few flexible workers).",
    ["action"], registry=REGISTRY)
PLANNER_PREDICTED_GAIN = Gauge(
    "kvmesh:planner_predicted_gain",
    "The planner's last predicted relative goodput change of the best split over the current one (0.25: +25 %).",
    registry=REGISTRY)

_servers: list = []


def observe_load(load) -> None:
    """Set the worker gauges from a load report (a `WorkerLoad`-like object: num_waiting, num_running,
    num_free_blocks, num_total_blocks); workers call it whenever they compute their load."""
    NUM_REQUESTS_WAITING.set(load.num_waiting)
    NUM_REQUESTS_RUNNING.set(load.num_running)
    KV_BLOCKS_FREE.set(load.num_free_blocks)
    KV_BLOCKS_USED.set(max(load.num_total_blocks - load.num_free_blocks, 0))


def observe_preemptions(total: int) -> None:
    """Count preemptions up to the engine's running total (workers call it with their load)."""
    NUM_PREEMPTIONS.inc(max(total - _preemptions_seen[0], 0))
    _preemptions_seen[0] = max(total, _preemptions_seen[0])


_preemptions_seen = [0]


def observe_spec_decode(num_drafts: int, num_accepted: int) -> None:
    """Count one verified draft: tokens proposed and tokens accepted."""
    SPEC_DECODE_DRAFT_TOKENS.inc(num_drafts)
    SPEC_DECODE_ACCEPTED_TOKENS.inc(num_accepted)


def observe_kv_transfer(backend: str, direction: str, num_bytes: int, seconds: float) -> None:
    """Count one KV transfer's bytes and duration."""
    KV_TRANSFER_BYTES.labels(backend=backend, direction=direction).inc(num_bytes)
    KV_TRANSFER_SECONDS.labels(backend=backend, direction=direction).observe(seconds)


def observe_request(ttft: float, e2e: float, num_output_tokens: int) -> None:
    """Record a finished request's TTFT, end-to-end latency and TPOT (when it made more than one token)."""
    TIME_TO_FIRST_TOKEN.observe(ttft)
    E2E_REQUEST_LATENCY.observe(e2e)
    if num_output_tokens > 1:
        TIME_PER_OUTPUT_TOKEN.observe((e2e - ttft) / (num_output_tokens - 1))


def start_metrics_server(port: int, host: str = "127.0.0.1") -> int:
    """Serve /metrics from a daemon thread on host:port (0 picks a free port); returns the bound port."""
    server, _thread = start_http_server(port, addr=host, registry=REGISTRY)
    _servers.append(server)
    return server.server_port


def stop_metrics_servers() -> None:
    """Close every server start_metrics_server() opened (for tests and clean shutdown)."""
    while _servers:
        server = _servers.pop()
        server.shutdown()
        server.server_close()


def metrics_asgi_app():
    """An ASGI app answering Prometheus scrapes, to mount at /metrics on the gateway's HTTP port."""
    return make_asgi_app(registry=REGISTRY)


def render_latest() -> tuple[bytes, str]:
    """The current exposition text and its content type, for a hand-written /metrics handler."""
    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST
