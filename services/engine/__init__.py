"""The inference engine: model, paged KV cache, sampler, continuous batching. No gRPC in here."""
