"""What every kvmesh service needs, and nothing only some of them use (the engine workers' kit is
`kvmesh.services.worker`). Imports no service package and not the engine.

| module | owns |
| --- | --- |
| `server.py` | the one grpc.aio server skeleton: health, reflection, interceptors, background tasks, graceful stop |
| `bind.py` | BindError and the plain-socket check that a listener can bind its address |
| `config.py` | one frozen dataclass config per service, from flags, `KVMESH_*` variables and defaults |
| `channels.py` | client channels to peers: keepalive, message limits, tracing interceptors, one per address |
| `errors.py` | the typed errors every service raises, and their gRPC status in one place |
| `telemetry.py` | OpenTelemetry set-up, exporters, context carriers, after-the-fact spans |
| `rpc_tracing.py` | the gRPC interceptors that carry a trace across hops, and which RPCs stay untraced |
| `conventions.py` | span names, attribute names and TTFT phases (written by the services, read by `kvmesh trace`) |
| `metrics.py` | the Prometheus metrics and their `/metrics` endpoint |
| `registration.py` | register with the scheduler, heartbeat, deregister (workers and the cache) |
| `ids.py`, `sdnotify.py`, `healthcheck.py` | instance and host ids; systemd readiness and watchdog; the health probe |
"""
