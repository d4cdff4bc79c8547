from kvmesh.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class OpenRequest(_message.Message):
    __slots__ = ("transfer_id", "dst_block_ids", "layout", "backend", "sender_host_id", "staged")
    TRANSFER_ID_FIELD_NUMBER: _ClassVar[int]
    DST_BLOCK_IDS_FIELD_NUMBER: _ClassVar[int]
    LAYOUT_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    SENDER_HOST_ID_FIELD_NUMBER: _ClassVar[int]
    STAGED_FIELD_NUMBER: _ClassVar[int]
    transfer_id: str
    dst_block_ids: _containers.RepeatedScalarFieldContainer[int]
    layout: _common_pb2.KVLayout
    backend: str
    sender_host_id: str
    staged: bool
    def __init__(self, transfer_id: _Optional[str] = ..., dst_block_ids: _Optional[_Iterable[int]] = ..., layout: _Optional[_Union[_common_pb2.KVLayout, _Mapping]] = ..., backend: _Optional[str] = ..., sender_host_id: _Optional[str] = ..., staged: _Optional[bool] = ...) -> None: ...

class OpenReply(_message.Message):
    __slots__ = ("lease_remaining_s",)
    LEASE_REMAINING_S_FIELD_NUMBER: _ClassVar[int]
    lease_remaining_s: float
    def __init__(self, lease_remaining_s: _Optional[float] = ...) -> None: ...

class KVSpan(_message.Message):
    __slots__ = ("layer", "kv", "dst_block_start", "num_blocks", "offset", "nbytes")
    LAYER_FIELD_NUMBER: _ClassVar[int]
    KV_FIELD_NUMBER: _ClassVar[int]
    DST_BLOCK_START_FIELD_NUMBER: _ClassVar[int]
    NUM_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    NBYTES_FIELD_NUMBER: _ClassVar[int]
    layer: int
    kv: int
    dst_block_start: int
    num_blocks: int
    offset: int
    nbytes: int
    def __init__(self, layer: _Optional[int] = ..., kv: _Optional[int] = ..., dst_block_start: _Optional[int] = ..., num_blocks: _Optional[int] = ..., offset: _Optional[int] = ..., nbytes: _Optional[int] = ...) -> None: ...

class KVChunk(_message.Message):
    __slots__ = ("transfer_id", "dtype", "spans", "nbytes", "checksum", "has_checksum", "layer_checksums", "open", "data")
    TRANSFER_ID_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SPANS_FIELD_NUMBER: _ClassVar[int]
    NBYTES_FIELD_NUMBER: _ClassVar[int]
    CHECKSUM_FIELD_NUMBER: _ClassVar[int]
    HAS_CHECKSUM_FIELD_NUMBER: _ClassVar[int]
    LAYER_CHECKSUMS_FIELD_NUMBER: _ClassVar[int]
    OPEN_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    transfer_id: str
    dtype: str
    spans: _containers.RepeatedCompositeFieldContainer[KVSpan]
    nbytes: int
    checksum: int
    has_checksum: bool
    layer_checksums: bool
    open: OpenRequest
    data: bytes
    def __init__(self, transfer_id: _Optional[str] = ..., dtype: _Optional[str] = ..., spans: _Optional[_Iterable[_Union[KVSpan, _Mapping]]] = ..., nbytes: _Optional[int] = ..., checksum: _Optional[int] = ..., has_checksum: _Optional[bool] = ..., layer_checksums: _Optional[bool] = ..., open: _Optional[_Union[OpenRequest, _Mapping]] = ..., data: _Optional[bytes] = ...) -> None: ...

class PushReply(_message.Message):
    __slots__ = ("nbytes", "num_chunks")
    NBYTES_FIELD_NUMBER: _ClassVar[int]
    NUM_CHUNKS_FIELD_NUMBER: _ClassVar[int]
    nbytes: int
    num_chunks: int
    def __init__(self, nbytes: _Optional[int] = ..., num_chunks: _Optional[int] = ...) -> None: ...

class CommitRequest(_message.Message):
    __slots__ = ("transfer_id", "backend", "nbytes", "layer_checksums", "has_checksums", "push_streams", "open", "staged")
    TRANSFER_ID_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    NBYTES_FIELD_NUMBER: _ClassVar[int]
    LAYER_CHECKSUMS_FIELD_NUMBER: _ClassVar[int]
    HAS_CHECKSUMS_FIELD_NUMBER: _ClassVar[int]
    PUSH_STREAMS_FIELD_NUMBER: _ClassVar[int]
    OPEN_FIELD_NUMBER: _ClassVar[int]
    STAGED_FIELD_NUMBER: _ClassVar[int]
    transfer_id: str
    backend: str
    nbytes: int
    layer_checksums: _containers.RepeatedScalarFieldContainer[int]
    has_checksums: bool
    push_streams: int
    open: OpenRequest
    staged: StagedBytes
    def __init__(self, transfer_id: _Optional[str] = ..., backend: _Optional[str] = ..., nbytes: _Optional[int] = ..., layer_checksums: _Optional[_Iterable[int]] = ..., has_checksums: _Optional[bool] = ..., push_streams: _Optional[int] = ..., open: _Optional[_Union[OpenRequest, _Mapping]] = ..., staged: _Optional[_Union[StagedBytes, _Mapping]] = ...) -> None: ...

class StagedBytes(_message.Message):
    __slots__ = ("segment", "offset", "segment_bytes")
    SEGMENT_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    SEGMENT_BYTES_FIELD_NUMBER: _ClassVar[int]
    segment: str
    offset: int
    segment_bytes: int
    def __init__(self, segment: _Optional[str] = ..., offset: _Optional[int] = ..., segment_bytes: _Optional[int] = ...) -> None: ...

class CommitReply(_message.Message):
    __slots__ = ("checksum_seconds", "seconds")
    CHECKSUM_SECONDS_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    checksum_seconds: float
    seconds: float
    def __init__(self, checksum_seconds: _Optional[float] = ..., seconds: _Optional[float] = ...) -> None: ...

class LayerWrittenRequest(_message.Message):
    __slots__ = ("transfer_id", "layer")
    TRANSFER_ID_FIELD_NUMBER: _ClassVar[int]
    LAYER_FIELD_NUMBER: _ClassVar[int]
    transfer_id: str
    layer: int
    def __init__(self, transfer_id: _Optional[str] = ..., layer: _Optional[int] = ...) -> None: ...

class LayerWrittenReply(_message.Message):
    __slots__ = ("accepted",)
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    accepted: bool
    def __init__(self, accepted: _Optional[bool] = ...) -> None: ...

class AbortRequest(_message.Message):
    __slots__ = ("transfer_id", "reason")
    TRANSFER_ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    transfer_id: str
    reason: str
    def __init__(self, transfer_id: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class AbortReply(_message.Message):
    __slots__ = ("found",)
    FOUND_FIELD_NUMBER: _ClassVar[int]
    found: bool
    def __init__(self, found: _Optional[bool] = ...) -> None: ...
