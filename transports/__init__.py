"""KV transports: one contract, one module per backend."""
