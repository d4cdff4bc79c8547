"""The engine's typed errors. Each names its gRPC status as plain text in `status` (the engine imports no gRPC);
`kvmesh.services.common.errors` reads that name, so the service layer maps them without importing the engine."""


class EngineError(Exception):
    """Base of every error the engine raises on purpose: INTERNAL."""

    status = "INTERNAL"


class InvalidRequestError(EngineError, ValueError):
    """The request cannot be served as asked (bad prompt, bad sampling parameters): INVALID_ARGUMENT."""

    status = "INVALID_ARGUMENT"


class UnsupportedModelError(EngineError, ValueError):
    """The checkpoint's architecture or settings are outside what the engine implements: INVALID_ARGUMENT."""

    status = "INVALID_ARGUMENT"


class OutOfBlocksError(EngineError):
    """The KV cache has no room for the request right now: RESOURCE_EXHAUSTED."""

    status = "RESOURCE_EXHAUSTED"


class RankFailedError(EngineError):
    """A tensor-parallel rank died or stopped answering; the engine cannot step any more: UNAVAILABLE."""

    status = "UNAVAILABLE"
