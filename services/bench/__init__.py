"""`kvmesh bench serve` and `kvmesh bench trace-gen`: load for a running mesh, and traces to replay.

The load generator follows `vllm bench serve` (its flag names where they exist) and AIPerf's synthetic prompts:
every prompt is a list of token ids built from blocks, so two requests that name the same block (a Mooncake
trace's `hash_ids`, a shared system prompt, a conversation's history) send byte-equal prefixes and the mesh's
KV caches see real reuse. One asyncio process holds thousands of streams; arrivals follow a schedule fixed
before the run (Poisson, gamma, constant, all at once, or a trace's timestamps), so a slow server never slows
the offered load down.

Modules: `lengths` (length distributions), `arrivals` (when each request is sent), `datasets` (what is sent),
`client` (OpenAI SSE over HTTP, the gateway's gRPC stream), `metrics` (per-request timings → aggregates and
goodput), `serve` (the run), `report` (tables, JSON), `plots` (PNG), `trace_gen` (Mooncake traces), `stub`
(an instant OpenAI SSE server for tests and the overhead benchmark), `cli` (the flags).
"""
