"""The engine's typed errors. Services map each to one gRPC status in `kvmesh.services.common.errors`."""


class EngineError(Exception):
    """Base of every error the engine raises on purpose."""


class InvalidRequestError(EngineError, ValueError):
    """The request cannot be served as asked (bad prompt, bad sampling parameters): INVALID_ARGUMENT."""


class UnsupportedModelError(EngineError, ValueError):
    """The checkpoint's architecture or settings are outside what the engine implements."""


class OutOfBlocksError(EngineError):
    """The KV cache has no room for the request right now: RESOURCE_EXHAUSTED."""
