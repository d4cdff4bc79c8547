"""The inference engine: model, paged KV cache, sampler, continuous batching. No gRPC in here.

engine.py (the `LLMEngine` facade), loader.py (weights, tokenizer, pool sizing), kv_cache.py (the block pool and
allocator), prefix_cache.py (blocks findable by hash), reservations.py (blocks held before a prompt runs),
scheduler.py (continuous batching), step.py (one forward step), validation.py, sampler.py, sequence.py,
output.py. The KV layout and block hashes come from `kvmesh.services.kv_identity`.
"""
