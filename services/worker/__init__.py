"""The engine-worker kit: what the prefill and decode workers share, and nothing any other service needs.

| module | owns |
| --- | --- |
| `config.py` | `WorkerConfig`: the settings every engine worker shares (model, KV pool, transport, handoff lease) |
| `startup.py` | `setup_worker()`: thread count, engine loading into a transport-reachable KV region, the engine thread; `WorkerKit.run()` starts and stops them with the server and registers with the scheduler |
| `engine_thread.py` | `EngineThread`: the engine stepped on a dedicated thread, commands and outputs passed by message |
| `handoff.py` | the KV handoff state machine (`reserved → writing → ready → decoding → released`) and its leases |
| `convert.py` | protobuf ↔ engine: the KV layout, sampling params, logprobs |

It sits between the workers (`services/prefill`, `services/decode`) and what they build on (`services/common`,
`services/engine`, `kvmesh.transports`); nothing below it imports it.
"""
