"""A decode worker's failures as the statuses clients see: a handoff that ended early, a prefill worker's error, a
failed KV transfer."""

from __future__ import annotations

import grpc

from kvmesh.services.common import errors
from kvmesh.services.worker.handoff import Handoff, HandoffState
from kvmesh.transports import TransportError


def ended_error(record: Handoff) -> errors.MeshError:
    """The status of a request whose handoff ended before its stream did."""
    where = f"request {record.request_id} ended on the decode worker ({record.reason or record.state.value})"
    if record.state is HandoffState.EXPIRED:
        return errors.DeadlineError(where)
    if record.reason == "aborted":
        return errors.MeshError.with_status(grpc.StatusCode.CANCELLED, where)
    return errors.UnavailableError(where)


def peer_error(address: str, e: grpc.aio.AioRpcError) -> errors.MeshError:
    """A failed Prefill call as the error the client sees, naming the worker."""
    code = e.code()
    message = f"prefill worker {address} failed: {code.name}: {errors.peer_text(e)}"
    if code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.DATA_LOSS,
                grpc.StatusCode.DEADLINE_EXCEEDED):
        return errors.MeshError.with_status(code, message)
    return errors.UnavailableError(message)


def transfer_error(e: TransportError, prefill_address: str) -> errors.MeshError:
    """A failed KV transfer as the error the client sees (DATA_LOSS, DEADLINE_EXCEEDED, UNAVAILABLE, ...)."""
    return errors.MeshError.with_status(errors.status_for(e), f"KV transfer from prefill worker {prefill_address} "
                                                              f"failed: {e}")


QUEUE_RETRY_AFTER_S = 1.0  # a refusal for want of blocks: they free as streams finish, within seconds


def queue_refusal(num_tokens: int, waited_s: float, objective: bool, cause: Exception) -> errors.CapacityError:
    """RESOURCE_EXHAUSTED for a request that waited `waited_s` for free KV blocks in vain: its whole
    --queue-timeout-s, or (objective) what was left of the client's time-to-first-token objective, past which it
    is refused rather than served late."""
    why = ("past the client's time-to-first-token objective it is refused rather than served late" if objective
           else "the worker's --queue-timeout-s")
    return errors.CapacityError(f"no free KV blocks for {num_tokens} prompt tokens after {waited_s:.3g} s ({why}): "
                                f"{cause}", retry_after_s=QUEUE_RETRY_AFTER_S)
