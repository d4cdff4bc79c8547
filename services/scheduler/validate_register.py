"""What a worker may claim when it registers or heartbeats: sane load figures, an address a peer can dial, a KV
layout that describes a real pool. A claim outside these is refused with INVALID_ARGUMENT naming the field, before
the registry or a routing policy sees it (a negative load would otherwise win every least-loaded choice)."""

from __future__ import annotations

import ipaddress
import math
import re

from kvmesh.services.common.errors import InvalidArgumentError
from kvmesh.services.common.registration import MAX_ARRIVALS, MAX_ARRIVED_ID_CHARS
from kvmesh.v1 import common_pb2, scheduler_pb2

MAX_COUNT = 10_000_000  # requests or blocks a worker may report
MAX_TEXT = 256  # characters of an id, a model name or an address
MAX_TRANSFER_SAMPLES = 256  # KV transfers one report may carry (a worker keeps fewer)
MAX_TRANSFER_BYTES = 1 << 40
MAX_TRANSFER_S = 3600.0
DTYPES = ("float32", "bfloat16", "float16")
_HOSTNAME = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9.-]{0,252})$")
_BACKEND = re.compile(r"^[a-z0-9_-]{1,32}$")
_LAYOUT_BOUNDS = {"block_size": 4096, "num_layers": 1024, "num_kv_heads": 1024, "head_dim": 4096}


def validate_load(load: scheduler_pb2.WorkerLoad, where: str = "load") -> None:
    """Raise InvalidArgumentError unless every figure is in [0, MAX_COUNT] and free blocks fit the pool."""
    for name in ("num_waiting", "num_running", "num_free_blocks", "num_total_blocks", "num_blocks_claimed"):
        value = getattr(load, name)
        if not 0 <= value <= MAX_COUNT:
            raise InvalidArgumentError(f"{where}.{name} must be in [0, {MAX_COUNT}], got {value}")
    if not 0 <= load.num_remaining_tokens <= MAX_COUNT * MAX_COUNT:
        raise InvalidArgumentError(f"{where}.num_remaining_tokens must be in [0, {MAX_COUNT * MAX_COUNT}], got "
                                   f"{load.num_remaining_tokens}")
    if not (math.isfinite(load.mean_output_tokens) and 0 <= load.mean_output_tokens <= MAX_COUNT):
        raise InvalidArgumentError(f"{where}.mean_output_tokens must be finite in [0, {MAX_COUNT}], got "
                                   f"{load.mean_output_tokens}")
    if load.num_total_blocks and load.num_free_blocks > load.num_total_blocks:
        raise InvalidArgumentError(f"{where}.num_free_blocks ({load.num_free_blocks}) exceeds "
                                   f"{where}.num_total_blocks ({load.num_total_blocks})")
    validate_transfers(load, where)


def validate_transfers(load: scheduler_pb2.WorkerLoad, where: str = "load") -> None:
    """Raise InvalidArgumentError unless the reported KV transfers are few, and each has bytes in
    [0, MAX_TRANSFER_BYTES] (SSD bytes among them), finite seconds in [0, MAX_TRANSFER_S], a backend name and a
    bounded peer: nothing a link model could not take."""
    if len(load.transfers) > MAX_TRANSFER_SAMPLES:
        raise InvalidArgumentError(f"{where}.transfers holds {len(load.transfers)} samples; at most "
                                   f"{MAX_TRANSFER_SAMPLES} per report")
    for i, t in enumerate(load.transfers):
        field = f"{where}.transfers[{i}]"
        if not 0 <= t.num_bytes <= MAX_TRANSFER_BYTES or not 0 <= t.num_ssd_bytes <= t.num_bytes:
            raise InvalidArgumentError(f"{field}: num_bytes must be in [0, {MAX_TRANSFER_BYTES}] and num_ssd_bytes "
                                       f"in [0, num_bytes], got {t.num_bytes} and {t.num_ssd_bytes}")
        if not (math.isfinite(t.seconds) and 0 <= t.seconds <= MAX_TRANSFER_S):
            raise InvalidArgumentError(f"{field}.seconds must be finite in [0, {MAX_TRANSFER_S}], got {t.seconds}")
        if not _BACKEND.match(t.backend) or len(t.peer) > MAX_TEXT:
            raise InvalidArgumentError(f"{field}: backend must be a short lower-case name and peer at most "
                                       f"{MAX_TEXT} characters")


def validate_heartbeat(request: scheduler_pb2.HeartbeatRequest) -> None:
    """Raise InvalidArgumentError for a heartbeat no real worker sends: a bad load, or more or longer arrived
    request ids than a worker could have had since its last heartbeat."""
    validate_load(request.load)
    if len(request.arrived_request_ids) > MAX_ARRIVALS:
        raise InvalidArgumentError(f"arrived_request_ids must list at most {MAX_ARRIVALS} ids "
                                   f"(got {len(request.arrived_request_ids)}): send reports_arrivals=false instead")
    if any(len(r) > MAX_ARRIVED_ID_CHARS for r in request.arrived_request_ids):
        raise InvalidArgumentError(f"arrived_request_ids must be ids of at most {MAX_ARRIVED_ID_CHARS} characters")


def validate_address(address: str, where: str = "address") -> None:
    """Raise InvalidArgumentError unless address is host:port (IPv6 in brackets) with a port in [1, 65535]."""
    host, sep, port = address.rpartition(":")
    if not sep or len(address) > MAX_TEXT or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise InvalidArgumentError(f"{where} must be host:port with a port in [1, 65535], got {address[:64]!r}")
    if host.startswith("[") and host.endswith("]"):
        try:
            ipaddress.IPv6Address(host[1:-1])
        except ValueError:
            raise InvalidArgumentError(f"{where} has an invalid IPv6 host {host[:64]!r}") from None
    elif not _HOSTNAME.match(host):
        raise InvalidArgumentError(f"{where} has an invalid host {host[:64]!r}: a name or an IP address")


def validate_layout(layout: common_pb2.KVLayout, where: str = "layout") -> None:
    """Raise InvalidArgumentError unless the layout names a model, a known dtype and positive, bounded sizes."""
    if not layout.model_id or len(layout.model_id) > MAX_TEXT:
        raise InvalidArgumentError(f"{where}.model_id must be a non-empty id of at most {MAX_TEXT} characters")
    if layout.dtype not in DTYPES:
        raise InvalidArgumentError(f"{where}.dtype must be one of {', '.join(DTYPES)}, got {layout.dtype[:32]!r}")
    for name, bound in _LAYOUT_BOUNDS.items():
        value = getattr(layout, name)
        if not 1 <= value <= bound:
            raise InvalidArgumentError(f"{where}.{name} must be in [1, {bound}], got {value}")


def _validate_descriptor(request: scheduler_pb2.RegisterRequest) -> None:
    d = request.descriptor
    if d.address:
        validate_address(d.address, "descriptor.address")
    if not 0 <= d.num_blocks <= MAX_COUNT:
        raise InvalidArgumentError(f"descriptor.num_blocks must be in [0, {MAX_COUNT}], got {d.num_blocks}")
    if d.HasField("layout") and d.layout.block_size and d.layout != request.layout:
        raise InvalidArgumentError("descriptor.layout must equal the worker's layout")
    if len(d.control_socket) > 107 or len(d.host_id) > MAX_TEXT:
        raise InvalidArgumentError("descriptor.control_socket (at most 107 characters) or host_id is too long")
    bad = [b for b in d.backends if not _BACKEND.match(b)]
    if bad or len(d.backends) > 8:
        raise InvalidArgumentError("descriptor.backends must be at most 8 short lower-case backend names")


def validate_register(request: scheduler_pb2.RegisterRequest) -> None:
    """Raise InvalidArgumentError naming the first field of a RegisterRequest no real worker would send."""
    validate_address(request.address)
    for name in ("host_id", "instance_id", "model"):
        if len(getattr(request, name)) > MAX_TEXT:
            raise InvalidArgumentError(f"{name} must be at most {MAX_TEXT} characters")
    bad = [b for b in request.transports if not _BACKEND.match(b)]
    if bad or len(request.transports) > 8:
        raise InvalidArgumentError("transports must be at most 8 short lower-case backend names")
    if request.role in (scheduler_pb2.WORKER_ROLE_PREFILL, scheduler_pb2.WORKER_ROLE_DECODE):
        validate_layout(request.layout)
    elif request.HasField("layout") and request.layout.block_size:
        validate_layout(request.layout)
    if request.HasField("local_prefill_max_tokens") and not 0 <= request.local_prefill_max_tokens <= MAX_COUNT:
        raise InvalidArgumentError(f"local_prefill_max_tokens must be in [0, {MAX_COUNT}], "
                                   f"got {request.local_prefill_max_tokens}")
    if request.HasField("descriptor"):
        _validate_descriptor(request)
    validate_load(request.load)
