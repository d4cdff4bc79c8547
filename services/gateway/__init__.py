"""The client-facing edge: the Gateway gRPC service and the OpenAI-compatible HTTP API, in one process.

| module | owns |
| --- | --- |
| `core.py` | the domain both front ends share: validate, route through the scheduler, relay the decode stream |
| `servicer.py` | the gRPC front end (Generate, Tokenize, ListModels) |
| `openai_api.py`, `openai_schema.py`, `openai_format.py` | the HTTP front end: routes, request bodies, response objects |
| `openai_errors.py` | the typed errors in OpenAI's JSON shape, through one gRPC → HTTP status table |
| `tokens.py` | tokenisation on a thread of its own, off the event loop, for both front ends |
| `observe.py` | a request's root span and latency metrics |
| `config.py`, `main.py` | `kvmesh gateway`'s settings and start-up |
"""
