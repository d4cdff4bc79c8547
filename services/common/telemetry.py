"""Placeholder for the telemetry module: four no-op functions with the real module's names and signatures.

The telemetry helper's real `telemetry.py` replaces this file at merge; the server skeleton codes against exactly
these names.
"""

from __future__ import annotations


def setup(service_name: str, role: str, instance_id: str) -> None:
    """Configure tracing and metrics for this process (no-op placeholder)."""


def server_interceptors() -> list:
    """grpc.aio server interceptors that open a span per RPC (none in the placeholder)."""
    return []


def client_interceptors() -> list:
    """grpc.aio client interceptors that carry the trace context (none in the placeholder)."""
    return []


def shutdown() -> None:
    """Flush and close exporters (no-op placeholder)."""
