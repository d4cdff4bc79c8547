from kvmesh.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class BreakerState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    BREAKER_STATE_UNSPECIFIED: _ClassVar[BreakerState]
    BREAKER_STATE_CLOSED: _ClassVar[BreakerState]
    BREAKER_STATE_OPEN: _ClassVar[BreakerState]
    BREAKER_STATE_HALF_OPEN: _ClassVar[BreakerState]

class WorkerRole(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    WORKER_ROLE_UNSPECIFIED: _ClassVar[WorkerRole]
    WORKER_ROLE_PREFILL: _ClassVar[WorkerRole]
    WORKER_ROLE_DECODE: _ClassVar[WorkerRole]
    WORKER_ROLE_CACHE: _ClassVar[WorkerRole]
BREAKER_STATE_UNSPECIFIED: BreakerState
BREAKER_STATE_CLOSED: BreakerState
BREAKER_STATE_OPEN: BreakerState
BREAKER_STATE_HALF_OPEN: BreakerState
WORKER_ROLE_UNSPECIFIED: WorkerRole
WORKER_ROLE_PREFILL: WorkerRole
WORKER_ROLE_DECODE: WorkerRole
WORKER_ROLE_CACHE: WorkerRole

class WorkerLoad(_message.Message):
    __slots__ = ("num_waiting", "num_running", "num_free_blocks", "num_total_blocks", "steps", "num_pending_prefill_tokens", "num_pending_prefill", "num_blocks_claimed", "num_remaining_tokens", "mean_output_tokens", "transfers")
    NUM_WAITING_FIELD_NUMBER: _ClassVar[int]
    NUM_RUNNING_FIELD_NUMBER: _ClassVar[int]
    NUM_FREE_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    NUM_TOTAL_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    NUM_PENDING_PREFILL_TOKENS_FIELD_NUMBER: _ClassVar[int]
    NUM_PENDING_PREFILL_FIELD_NUMBER: _ClassVar[int]
    NUM_BLOCKS_CLAIMED_FIELD_NUMBER: _ClassVar[int]
    NUM_REMAINING_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MEAN_OUTPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TRANSFERS_FIELD_NUMBER: _ClassVar[int]
    num_waiting: int
    num_running: int
    num_free_blocks: int
    num_total_blocks: int
    steps: _containers.RepeatedCompositeFieldContainer[StepSample]
    num_pending_prefill_tokens: int
    num_pending_prefill: int
    num_blocks_claimed: int
    num_remaining_tokens: int
    mean_output_tokens: float
    transfers: _containers.RepeatedCompositeFieldContainer[TransferSample]
    def __init__(self, num_waiting: _Optional[int] = ..., num_running: _Optional[int] = ..., num_free_blocks: _Optional[int] = ..., num_total_blocks: _Optional[int] = ..., steps: _Optional[_Iterable[_Union[StepSample, _Mapping]]] = ..., num_pending_prefill_tokens: _Optional[int] = ..., num_pending_prefill: _Optional[int] = ..., num_blocks_claimed: _Optional[int] = ..., num_remaining_tokens: _Optional[int] = ..., mean_output_tokens: _Optional[float] = ..., transfers: _Optional[_Iterable[_Union[TransferSample, _Mapping]]] = ...) -> None: ...

class TransferSample(_message.Message):
    __slots__ = ("num_bytes", "seconds", "backend", "peer", "num_ssd_bytes", "cache_fetch")
    NUM_BYTES_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    PEER_FIELD_NUMBER: _ClassVar[int]
    NUM_SSD_BYTES_FIELD_NUMBER: _ClassVar[int]
    CACHE_FETCH_FIELD_NUMBER: _ClassVar[int]
    num_bytes: int
    seconds: float
    backend: str
    peer: str
    num_ssd_bytes: int
    cache_fetch: bool
    def __init__(self, num_bytes: _Optional[int] = ..., seconds: _Optional[float] = ..., backend: _Optional[str] = ..., peer: _Optional[str] = ..., num_ssd_bytes: _Optional[int] = ..., cache_fetch: _Optional[bool] = ...) -> None: ...

class StepSample(_message.Message):
    __slots__ = ("num_prefill_tokens", "num_attention_pairs", "num_decode_seqs", "num_context_tokens", "seconds")
    NUM_PREFILL_TOKENS_FIELD_NUMBER: _ClassVar[int]
    NUM_ATTENTION_PAIRS_FIELD_NUMBER: _ClassVar[int]
    NUM_DECODE_SEQS_FIELD_NUMBER: _ClassVar[int]
    NUM_CONTEXT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    num_prefill_tokens: int
    num_attention_pairs: int
    num_decode_seqs: int
    num_context_tokens: int
    seconds: float
    def __init__(self, num_prefill_tokens: _Optional[int] = ..., num_attention_pairs: _Optional[int] = ..., num_decode_seqs: _Optional[int] = ..., num_context_tokens: _Optional[int] = ..., seconds: _Optional[float] = ...) -> None: ...

class RegisterRequest(_message.Message):
    __slots__ = ("role", "address", "host_id", "instance_id", "transports", "layout", "descriptor", "load", "model", "local_prefill_max_tokens", "colocated", "flexible", "spills_kv")
    ROLE_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    HOST_ID_FIELD_NUMBER: _ClassVar[int]
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    TRANSPORTS_FIELD_NUMBER: _ClassVar[int]
    LAYOUT_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTOR_FIELD_NUMBER: _ClassVar[int]
    LOAD_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    LOCAL_PREFILL_MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    COLOCATED_FIELD_NUMBER: _ClassVar[int]
    FLEXIBLE_FIELD_NUMBER: _ClassVar[int]
    SPILLS_KV_FIELD_NUMBER: _ClassVar[int]
    role: WorkerRole
    address: str
    host_id: str
    instance_id: str
    transports: _containers.RepeatedScalarFieldContainer[str]
    layout: _common_pb2.KVLayout
    descriptor: _common_pb2.TransportDescriptor
    load: WorkerLoad
    model: str
    local_prefill_max_tokens: int
    colocated: bool
    flexible: bool
    spills_kv: bool
    def __init__(self, role: _Optional[_Union[WorkerRole, str]] = ..., address: _Optional[str] = ..., host_id: _Optional[str] = ..., instance_id: _Optional[str] = ..., transports: _Optional[_Iterable[str]] = ..., layout: _Optional[_Union[_common_pb2.KVLayout, _Mapping]] = ..., descriptor: _Optional[_Union[_common_pb2.TransportDescriptor, _Mapping]] = ..., load: _Optional[_Union[WorkerLoad, _Mapping]] = ..., model: _Optional[str] = ..., local_prefill_max_tokens: _Optional[int] = ..., colocated: _Optional[bool] = ..., flexible: _Optional[bool] = ..., spills_kv: _Optional[bool] = ...) -> None: ...

class RegisterResponse(_message.Message):
    __slots__ = ("worker_id", "lease_seconds", "heartbeat_interval_seconds", "lease_token")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    LEASE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_INTERVAL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    LEASE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    lease_seconds: float
    heartbeat_interval_seconds: float
    lease_token: str
    def __init__(self, worker_id: _Optional[str] = ..., lease_seconds: _Optional[float] = ..., heartbeat_interval_seconds: _Optional[float] = ..., lease_token: _Optional[str] = ...) -> None: ...

class KVEvents(_message.Message):
    __slots__ = ("stored", "removed", "full")
    STORED_FIELD_NUMBER: _ClassVar[int]
    REMOVED_FIELD_NUMBER: _ClassVar[int]
    FULL_FIELD_NUMBER: _ClassVar[int]
    stored: _containers.RepeatedScalarFieldContainer[bytes]
    removed: _containers.RepeatedScalarFieldContainer[bytes]
    full: bool
    def __init__(self, stored: _Optional[_Iterable[bytes]] = ..., removed: _Optional[_Iterable[bytes]] = ..., full: _Optional[bool] = ...) -> None: ...

class HeartbeatRequest(_message.Message):
    __slots__ = ("worker_id", "load", "kv_events", "reports_arrivals", "arrived_request_ids", "lease_token")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    LOAD_FIELD_NUMBER: _ClassVar[int]
    KV_EVENTS_FIELD_NUMBER: _ClassVar[int]
    REPORTS_ARRIVALS_FIELD_NUMBER: _ClassVar[int]
    ARRIVED_REQUEST_IDS_FIELD_NUMBER: _ClassVar[int]
    LEASE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    load: WorkerLoad
    kv_events: KVEvents
    reports_arrivals: bool
    arrived_request_ids: _containers.RepeatedScalarFieldContainer[str]
    lease_token: str
    def __init__(self, worker_id: _Optional[str] = ..., load: _Optional[_Union[WorkerLoad, _Mapping]] = ..., kv_events: _Optional[_Union[KVEvents, _Mapping]] = ..., reports_arrivals: _Optional[bool] = ..., arrived_request_ids: _Optional[_Iterable[str]] = ..., lease_token: _Optional[str] = ...) -> None: ...

class HeartbeatResponse(_message.Message):
    __slots__ = ("lease_seconds", "resync_kv_events", "desired_role")
    LEASE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    RESYNC_KV_EVENTS_FIELD_NUMBER: _ClassVar[int]
    DESIRED_ROLE_FIELD_NUMBER: _ClassVar[int]
    lease_seconds: float
    resync_kv_events: bool
    desired_role: WorkerRole
    def __init__(self, lease_seconds: _Optional[float] = ..., resync_kv_events: _Optional[bool] = ..., desired_role: _Optional[_Union[WorkerRole, str]] = ...) -> None: ...

class DeregisterRequest(_message.Message):
    __slots__ = ("worker_id", "lease_token")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    LEASE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    lease_token: str
    def __init__(self, worker_id: _Optional[str] = ..., lease_token: _Optional[str] = ...) -> None: ...

class DeregisterResponse(_message.Message):
    __slots__ = ("removed",)
    REMOVED_FIELD_NUMBER: _ClassVar[int]
    removed: bool
    def __init__(self, removed: _Optional[bool] = ...) -> None: ...

class RouteRequest(_message.Message):
    __slots__ = ("request_id", "prompt_token_ids", "model", "layout", "cache_salt", "dry_run", "avoid_worker_ids", "slo_ttft_seconds", "slo_tpot_seconds", "max_tokens", "priority")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    LAYOUT_FIELD_NUMBER: _ClassVar[int]
    CACHE_SALT_FIELD_NUMBER: _ClassVar[int]
    DRY_RUN_FIELD_NUMBER: _ClassVar[int]
    AVOID_WORKER_IDS_FIELD_NUMBER: _ClassVar[int]
    SLO_TTFT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    SLO_TPOT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    prompt_token_ids: _containers.RepeatedScalarFieldContainer[int]
    model: str
    layout: _common_pb2.KVLayout
    cache_salt: str
    dry_run: bool
    avoid_worker_ids: _containers.RepeatedScalarFieldContainer[str]
    slo_ttft_seconds: float
    slo_tpot_seconds: float
    max_tokens: int
    priority: int
    def __init__(self, request_id: _Optional[str] = ..., prompt_token_ids: _Optional[_Iterable[int]] = ..., model: _Optional[str] = ..., layout: _Optional[_Union[_common_pb2.KVLayout, _Mapping]] = ..., cache_salt: _Optional[str] = ..., dry_run: _Optional[bool] = ..., avoid_worker_ids: _Optional[_Iterable[str]] = ..., slo_ttft_seconds: _Optional[float] = ..., slo_tpot_seconds: _Optional[float] = ..., max_tokens: _Optional[int] = ..., priority: _Optional[int] = ...) -> None: ...

class WorkerInfo(_message.Message):
    __slots__ = ("worker_id", "role", "address", "host_id", "instance_id", "transports", "layout", "descriptor", "load", "model", "lease_remaining_seconds", "breaker_state", "num_routed_since_heartbeat", "num_breaker_opened", "num_breaker_failures", "colocated", "flexible", "desired_role")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    HOST_ID_FIELD_NUMBER: _ClassVar[int]
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    TRANSPORTS_FIELD_NUMBER: _ClassVar[int]
    LAYOUT_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTOR_FIELD_NUMBER: _ClassVar[int]
    LOAD_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    LEASE_REMAINING_SECONDS_FIELD_NUMBER: _ClassVar[int]
    BREAKER_STATE_FIELD_NUMBER: _ClassVar[int]
    NUM_ROUTED_SINCE_HEARTBEAT_FIELD_NUMBER: _ClassVar[int]
    NUM_BREAKER_OPENED_FIELD_NUMBER: _ClassVar[int]
    NUM_BREAKER_FAILURES_FIELD_NUMBER: _ClassVar[int]
    COLOCATED_FIELD_NUMBER: _ClassVar[int]
    FLEXIBLE_FIELD_NUMBER: _ClassVar[int]
    DESIRED_ROLE_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    role: WorkerRole
    address: str
    host_id: str
    instance_id: str
    transports: _containers.RepeatedScalarFieldContainer[str]
    layout: _common_pb2.KVLayout
    descriptor: _common_pb2.TransportDescriptor
    load: WorkerLoad
    model: str
    lease_remaining_seconds: float
    breaker_state: BreakerState
    num_routed_since_heartbeat: int
    num_breaker_opened: int
    num_breaker_failures: int
    colocated: bool
    flexible: bool
    desired_role: WorkerRole
    def __init__(self, worker_id: _Optional[str] = ..., role: _Optional[_Union[WorkerRole, str]] = ..., address: _Optional[str] = ..., host_id: _Optional[str] = ..., instance_id: _Optional[str] = ..., transports: _Optional[_Iterable[str]] = ..., layout: _Optional[_Union[_common_pb2.KVLayout, _Mapping]] = ..., descriptor: _Optional[_Union[_common_pb2.TransportDescriptor, _Mapping]] = ..., load: _Optional[_Union[WorkerLoad, _Mapping]] = ..., model: _Optional[str] = ..., lease_remaining_seconds: _Optional[float] = ..., breaker_state: _Optional[_Union[BreakerState, str]] = ..., num_routed_since_heartbeat: _Optional[int] = ..., num_breaker_opened: _Optional[int] = ..., num_breaker_failures: _Optional[int] = ..., colocated: _Optional[bool] = ..., flexible: _Optional[bool] = ..., desired_role: _Optional[_Union[WorkerRole, str]] = ...) -> None: ...

class RouteResponse(_message.Message):
    __slots__ = ("prefill", "decode", "num_cached_tokens", "policy", "num_decode_cached_tokens", "prompt_block_hashes", "local_prefill", "cache_probed", "kv_source", "predicted_ttft_seconds", "predicted_tpot_seconds", "kv_peer")
    PREFILL_FIELD_NUMBER: _ClassVar[int]
    DECODE_FIELD_NUMBER: _ClassVar[int]
    NUM_CACHED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    POLICY_FIELD_NUMBER: _ClassVar[int]
    NUM_DECODE_CACHED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    PROMPT_BLOCK_HASHES_FIELD_NUMBER: _ClassVar[int]
    LOCAL_PREFILL_FIELD_NUMBER: _ClassVar[int]
    CACHE_PROBED_FIELD_NUMBER: _ClassVar[int]
    KV_SOURCE_FIELD_NUMBER: _ClassVar[int]
    PREDICTED_TTFT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    PREDICTED_TPOT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    KV_PEER_FIELD_NUMBER: _ClassVar[int]
    prefill: WorkerInfo
    decode: WorkerInfo
    num_cached_tokens: int
    policy: str
    num_decode_cached_tokens: int
    prompt_block_hashes: _containers.RepeatedScalarFieldContainer[bytes]
    local_prefill: bool
    cache_probed: bool
    kv_source: str
    predicted_ttft_seconds: float
    predicted_tpot_seconds: float
    kv_peer: WorkerInfo
    def __init__(self, prefill: _Optional[_Union[WorkerInfo, _Mapping]] = ..., decode: _Optional[_Union[WorkerInfo, _Mapping]] = ..., num_cached_tokens: _Optional[int] = ..., policy: _Optional[str] = ..., num_decode_cached_tokens: _Optional[int] = ..., prompt_block_hashes: _Optional[_Iterable[bytes]] = ..., local_prefill: _Optional[bool] = ..., cache_probed: _Optional[bool] = ..., kv_source: _Optional[str] = ..., predicted_ttft_seconds: _Optional[float] = ..., predicted_tpot_seconds: _Optional[float] = ..., kv_peer: _Optional[_Union[WorkerInfo, _Mapping]] = ...) -> None: ...

class SchedulerStatsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class WorkerModel(_message.Message):
    __slots__ = ("worker_id", "role", "prefill", "decode", "num_samples", "num_outliers", "unpaired")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    PREFILL_FIELD_NUMBER: _ClassVar[int]
    DECODE_FIELD_NUMBER: _ClassVar[int]
    NUM_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    NUM_OUTLIERS_FIELD_NUMBER: _ClassVar[int]
    UNPAIRED_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    role: WorkerRole
    prefill: _containers.RepeatedScalarFieldContainer[float]
    decode: _containers.RepeatedScalarFieldContainer[float]
    num_samples: int
    num_outliers: int
    unpaired: str
    def __init__(self, worker_id: _Optional[str] = ..., role: _Optional[_Union[WorkerRole, str]] = ..., prefill: _Optional[_Iterable[float]] = ..., decode: _Optional[_Iterable[float]] = ..., num_samples: _Optional[int] = ..., num_outliers: _Optional[int] = ..., unpaired: _Optional[str] = ...) -> None: ...

class SchedulerStats(_message.Message):
    __slots__ = ("models", "policy", "links")
    MODELS_FIELD_NUMBER: _ClassVar[int]
    POLICY_FIELD_NUMBER: _ClassVar[int]
    LINKS_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[WorkerModel]
    policy: str
    links: _containers.RepeatedCompositeFieldContainer[LinkModel]
    def __init__(self, models: _Optional[_Iterable[_Union[WorkerModel, _Mapping]]] = ..., policy: _Optional[str] = ..., links: _Optional[_Iterable[_Union[LinkModel, _Mapping]]] = ...) -> None: ...

class LinkModel(_message.Message):
    __slots__ = ("kind", "sender_id", "receiver", "backend", "fixed_seconds", "gbps", "ssd_gbps", "num_samples", "num_outliers", "fitted")
    KIND_FIELD_NUMBER: _ClassVar[int]
    SENDER_ID_FIELD_NUMBER: _ClassVar[int]
    RECEIVER_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    FIXED_SECONDS_FIELD_NUMBER: _ClassVar[int]
    GBPS_FIELD_NUMBER: _ClassVar[int]
    SSD_GBPS_FIELD_NUMBER: _ClassVar[int]
    NUM_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    NUM_OUTLIERS_FIELD_NUMBER: _ClassVar[int]
    FITTED_FIELD_NUMBER: _ClassVar[int]
    kind: str
    sender_id: str
    receiver: str
    backend: str
    fixed_seconds: float
    gbps: float
    ssd_gbps: float
    num_samples: int
    num_outliers: int
    fitted: bool
    def __init__(self, kind: _Optional[str] = ..., sender_id: _Optional[str] = ..., receiver: _Optional[str] = ..., backend: _Optional[str] = ..., fixed_seconds: _Optional[float] = ..., gbps: _Optional[float] = ..., ssd_gbps: _Optional[float] = ..., num_samples: _Optional[int] = ..., num_outliers: _Optional[int] = ..., fitted: _Optional[bool] = ...) -> None: ...

class ReportFailureRequest(_message.Message):
    __slots__ = ("worker_id", "address", "role", "code", "message", "reporter")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    REPORTER_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    address: str
    role: WorkerRole
    code: int
    message: str
    reporter: str
    def __init__(self, worker_id: _Optional[str] = ..., address: _Optional[str] = ..., role: _Optional[_Union[WorkerRole, str]] = ..., code: _Optional[int] = ..., message: _Optional[str] = ..., reporter: _Optional[str] = ...) -> None: ...

class ReportFailureResponse(_message.Message):
    __slots__ = ("counted", "breaker_state")
    COUNTED_FIELD_NUMBER: _ClassVar[int]
    BREAKER_STATE_FIELD_NUMBER: _ClassVar[int]
    counted: bool
    breaker_state: BreakerState
    def __init__(self, counted: _Optional[bool] = ..., breaker_state: _Optional[_Union[BreakerState, str]] = ...) -> None: ...

class ListWorkersRequest(_message.Message):
    __slots__ = ("role",)
    ROLE_FIELD_NUMBER: _ClassVar[int]
    role: WorkerRole
    def __init__(self, role: _Optional[_Union[WorkerRole, str]] = ...) -> None: ...

class ListWorkersResponse(_message.Message):
    __slots__ = ("workers",)
    WORKERS_FIELD_NUMBER: _ClassVar[int]
    workers: _containers.RepeatedCompositeFieldContainer[WorkerInfo]
    def __init__(self, workers: _Optional[_Iterable[_Union[WorkerInfo, _Mapping]]] = ...) -> None: ...

class SetWorkerRoleRequest(_message.Message):
    __slots__ = ("address", "role", "reason")
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    address: str
    role: WorkerRole
    reason: str
    def __init__(self, address: _Optional[str] = ..., role: _Optional[_Union[WorkerRole, str]] = ..., reason: _Optional[str] = ...) -> None: ...

class SetWorkerRoleResponse(_message.Message):
    __slots__ = ("accepted",)
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    accepted: bool
    def __init__(self, accepted: _Optional[bool] = ...) -> None: ...
