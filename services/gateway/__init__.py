"""The client-facing edge: the Gateway gRPC service and the OpenAI-compatible HTTP API, in one process.

| module | owns |
| --- | --- |
| `core.py` | the domain both front ends share: validate, route through the scheduler, relay the decode stream |
| `servicer.py` | the gRPC front end (Generate, Tokenize, ListModels) |
| `openai_api.py`, `openai_schema.py`, `openai_format.py` | the HTTP front end: routes, request bodies, response objects |
| `openai_errors.py` | the typed errors in OpenAI's JSON shape, through one gRPC → HTTP status table |
| `tokens.py` | tokenisation on a thread of its own, off the event loop, for both front ends |
| `failover.py` | retries before the first token and migration after it: a failed attempt placed again |
| `stall.py` | a silent stream's worker asked for its health: a stopped worker is told from a slow one |
| `drain.py` | requests in flight, refused and ended explicitly when the gateway stops |
| `observe.py` | a request's root span and latency metrics |
| `config.py`, `main.py` | `kvmesh gateway`'s settings and start-up |
"""
