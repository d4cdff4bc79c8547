"""`kvmesh trace`: a request's spans as a terminal waterfall, and its TTFT split into phases.

Spans come from the JSON-lines file the `jsonl` exporter writes (`KVMESH_TRACES_FILE`, one
`ReadableSpan.to_json()` per line, several processes appending to one file) or from Jaeger's HTTP query API.

The naming convention every service follows (the names are constants in `kvmesh.services.common.conventions`,
beside telemetry, which the services import at run time; this CLI only reads them):

| span | made by | covers |
| --- | --- | --- |
| `gateway.Generate` | gateway | the whole request, gRPC or HTTP; sets `kvmesh.request_id`, and `kvmesh.ttft_s` (seconds, float) when the first token leaves |
| `scheduler.route` | scheduler | the routing decision (`kvmesh.route.prefill`, `kvmesh.route.decode`, `kvmesh.route.reason`, `kvmesh.cached_tokens`) |
| `decode.admit` | decode | reserving KV blocks for the request (`kvmesh.kv.blocks`) |
| `decode.queue` | decode | waiting for a batch slot |
| `prefill.queue` | prefill | waiting in prefill's token-budget batch |
| `prefill.compute` | prefill | the forward pass over the prompt (`kvmesh.prefill.tokens`) |
| `kv.transfer` | services, from transports' TransferStats (common/transfer_telemetry.py) | one KV move (`kvmesh.kv.bytes`, `kvmesh.kv.blocks`, `kvmesh.kv.backend`, `kvmesh.kv.gbps`, optional `kvmesh.kv.layer`, `kvmesh.kv.direction`) |
| `cache.lookup` | cache / its caller | how many leading blocks the cache holds (`kvmesh.cache.hit_blocks`, `kvmesh.cache.tier`) |
| `cache.get`, `cache.put` | cache / its caller | reading (before prefill) or offering (after) blocks (`kvmesh.kv.bytes`, `kvmesh.cache.tier`) |
| `decode.stream` | decode | generating after the first token (`kvmesh.output_tokens`) |

Every span of a request carries `kvmesh.request_id` where the service knows it; gRPC hops carry the trace context
in `traceparent` metadata (telemetry's interceptors), KV control messages and HTTP headers through
`telemetry.inject()` / `telemetry.extract()`.

TTFT breakdown: the window from the start of `gateway.Generate` to start + `kvmesh.ttft_s` is split instant by
instant. Each instant goes to the highest-priority phase with a span open then — prefill > transfer > cache >
queue — and to `other` when none is; so the phases always add up to the measured TTFT, and a transfer hidden
behind compute counts as prefill (only exposed transfer time shows as transfer). Spans map to phases by name
(`PHASE_OF_SPAN`); any span may set `kvmesh.phase` to one of the phase names to override that.
"""
