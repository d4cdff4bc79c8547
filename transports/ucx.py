"""The "ucx" backend (NIXL over UCX): placeholder until implemented; reports itself unavailable."""

from __future__ import annotations

from kvmesh.transports.base import Backend, Transfer


class UcxTransfer(Transfer):
    async def _write_runs(self, runs) -> None:  # pragma: no cover - never selected while unavailable
        raise NotImplementedError


class UcxBackend(Backend):
    """One-sided NIXL WRITEs into the receiver's registered region."""

    name = "ucx"
    one_sided = True
    transfer_class = UcxTransfer

    @classmethod
    def unavailable_reason(cls) -> str | None:
        return "ucx backend not implemented yet"
