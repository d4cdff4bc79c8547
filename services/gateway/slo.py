"""A request's latency objectives at the gateway: from the gRPC request's fields or the HTTP headers
`x-kvmesh-slo-ttft-ms` / `x-kvmesh-slo-tpot-ms`, validated here and passed to the scheduler's Route, which refuses
at once (429 / RESOURCE_EXHAUSTED with Retry-After) a request no route is predicted to meet."""

from __future__ import annotations

import math
from collections.abc import Mapping

from kvmesh.services.common.errors import InvalidArgumentError
from kvmesh.v1 import gateway_pb2, scheduler_pb2

TTFT_HEADER = "x-kvmesh-slo-ttft-ms"
TPOT_HEADER = "x-kvmesh-slo-tpot-ms"


def _seconds(name: str, value: float) -> float:
    if not math.isfinite(value) or value <= 0:
        raise InvalidArgumentError(f"{name} must be a positive number, got {value!r}; leave it out for the "
                                   f"scheduler's default")
    return value


def from_headers(headers: Mapping[str, str]) -> tuple[float | None, float | None]:
    """(TTFT, TPOT) objectives in seconds from the HTTP headers (milliseconds); None where a header is absent."""
    out = []
    for name in (TTFT_HEADER, TPOT_HEADER):
        raw = headers.get(name)
        if raw is None:
            out.append(None)
            continue
        try:
            ms = float(raw)
        except ValueError:
            raise InvalidArgumentError(f"header {name} must be a number of milliseconds, got {raw!r}") from None
        out.append(_seconds(f"header {name} (milliseconds)", ms) / 1000.0)
    return out[0], out[1]


def from_request(request: gateway_pb2.GenerateRequest) -> tuple[float | None, float | None]:
    """(TTFT, TPOT) objectives in seconds from a gRPC GenerateRequest; None where a field is unset."""
    return tuple(_seconds(field, getattr(request, field)) if request.HasField(field) else None
                 for field in ("slo_ttft_seconds", "slo_tpot_seconds"))


def apply(route: scheduler_pb2.RouteRequest, ttft_s: float | None, tpot_s: float | None) -> None:
    """Set the objectives the request gave on its Route request (unset ones take the scheduler's default)."""
    if ttft_s is not None:
        route.slo_ttft_seconds = ttft_s
    if tpot_s is not None:
        route.slo_tpot_seconds = tpot_s
