from kvmesh.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class LookupRequest(_message.Message):
    __slots__ = ("layout", "block_hashes", "peek")
    LAYOUT_FIELD_NUMBER: _ClassVar[int]
    BLOCK_HASHES_FIELD_NUMBER: _ClassVar[int]
    PEEK_FIELD_NUMBER: _ClassVar[int]
    layout: _common_pb2.KVLayout
    block_hashes: _containers.RepeatedScalarFieldContainer[bytes]
    peek: bool
    def __init__(self, layout: _Optional[_Union[_common_pb2.KVLayout, _Mapping]] = ..., block_hashes: _Optional[_Iterable[bytes]] = ..., peek: _Optional[bool] = ...) -> None: ...

class LookupResponse(_message.Message):
    __slots__ = ("num_cached_blocks", "num_dram_blocks", "num_ssd_blocks")
    NUM_CACHED_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    NUM_DRAM_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    NUM_SSD_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    num_cached_blocks: int
    num_dram_blocks: int
    num_ssd_blocks: int
    def __init__(self, num_cached_blocks: _Optional[int] = ..., num_dram_blocks: _Optional[int] = ..., num_ssd_blocks: _Optional[int] = ...) -> None: ...

class PutRequest(_message.Message):
    __slots__ = ("layout", "block_hash", "data", "checksum")
    LAYOUT_FIELD_NUMBER: _ClassVar[int]
    BLOCK_HASH_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    CHECKSUM_FIELD_NUMBER: _ClassVar[int]
    layout: _common_pb2.KVLayout
    block_hash: bytes
    data: bytes
    checksum: int
    def __init__(self, layout: _Optional[_Union[_common_pb2.KVLayout, _Mapping]] = ..., block_hash: _Optional[bytes] = ..., data: _Optional[bytes] = ..., checksum: _Optional[int] = ...) -> None: ...

class PutResponse(_message.Message):
    __slots__ = ("stored", "num_evicted")
    STORED_FIELD_NUMBER: _ClassVar[int]
    NUM_EVICTED_FIELD_NUMBER: _ClassVar[int]
    stored: bool
    num_evicted: int
    def __init__(self, stored: _Optional[bool] = ..., num_evicted: _Optional[int] = ...) -> None: ...

class GetRequest(_message.Message):
    __slots__ = ("layout", "block_hashes")
    LAYOUT_FIELD_NUMBER: _ClassVar[int]
    BLOCK_HASHES_FIELD_NUMBER: _ClassVar[int]
    layout: _common_pb2.KVLayout
    block_hashes: _containers.RepeatedScalarFieldContainer[bytes]
    def __init__(self, layout: _Optional[_Union[_common_pb2.KVLayout, _Mapping]] = ..., block_hashes: _Optional[_Iterable[bytes]] = ...) -> None: ...

class FetchRequest(_message.Message):
    __slots__ = ("layout", "block_hashes", "destination", "destination_blocks", "transfer_id")
    LAYOUT_FIELD_NUMBER: _ClassVar[int]
    BLOCK_HASHES_FIELD_NUMBER: _ClassVar[int]
    DESTINATION_FIELD_NUMBER: _ClassVar[int]
    DESTINATION_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    TRANSFER_ID_FIELD_NUMBER: _ClassVar[int]
    layout: _common_pb2.KVLayout
    block_hashes: _containers.RepeatedScalarFieldContainer[bytes]
    destination: _common_pb2.TransportDescriptor
    destination_blocks: _common_pb2.BlockRef
    transfer_id: str
    def __init__(self, layout: _Optional[_Union[_common_pb2.KVLayout, _Mapping]] = ..., block_hashes: _Optional[_Iterable[bytes]] = ..., destination: _Optional[_Union[_common_pb2.TransportDescriptor, _Mapping]] = ..., destination_blocks: _Optional[_Union[_common_pb2.BlockRef, _Mapping]] = ..., transfer_id: _Optional[str] = ...) -> None: ...

class FetchResponse(_message.Message):
    __slots__ = ("num_blocks", "num_dram_blocks", "num_ssd_blocks", "backend", "bytes", "seconds")
    NUM_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    NUM_DRAM_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    NUM_SSD_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    num_blocks: int
    num_dram_blocks: int
    num_ssd_blocks: int
    backend: str
    bytes: int
    seconds: float
    def __init__(self, num_blocks: _Optional[int] = ..., num_dram_blocks: _Optional[int] = ..., num_ssd_blocks: _Optional[int] = ..., backend: _Optional[str] = ..., bytes: _Optional[int] = ..., seconds: _Optional[float] = ...) -> None: ...

class CachedBlock(_message.Message):
    __slots__ = ("block_hash", "data", "checksum", "tier")
    BLOCK_HASH_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    CHECKSUM_FIELD_NUMBER: _ClassVar[int]
    TIER_FIELD_NUMBER: _ClassVar[int]
    block_hash: bytes
    data: bytes
    checksum: int
    tier: str
    def __init__(self, block_hash: _Optional[bytes] = ..., data: _Optional[bytes] = ..., checksum: _Optional[int] = ..., tier: _Optional[str] = ...) -> None: ...

class StatsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class StatsResponse(_message.Message):
    __slots__ = ("hits", "misses", "num_blocks", "num_bytes", "evictions", "capacity_bytes", "puts", "rejected_puts", "tiers", "corrupt_blocks", "dropped_writes", "staging_blocks_used", "staging_blocks_total", "open_transfers", "deliveries", "failed_deliveries", "staging_waits_exhausted", "staging_blocks_staged", "staging_blocks_shared")
    HITS_FIELD_NUMBER: _ClassVar[int]
    MISSES_FIELD_NUMBER: _ClassVar[int]
    NUM_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    NUM_BYTES_FIELD_NUMBER: _ClassVar[int]
    EVICTIONS_FIELD_NUMBER: _ClassVar[int]
    CAPACITY_BYTES_FIELD_NUMBER: _ClassVar[int]
    PUTS_FIELD_NUMBER: _ClassVar[int]
    REJECTED_PUTS_FIELD_NUMBER: _ClassVar[int]
    TIERS_FIELD_NUMBER: _ClassVar[int]
    CORRUPT_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    DROPPED_WRITES_FIELD_NUMBER: _ClassVar[int]
    STAGING_BLOCKS_USED_FIELD_NUMBER: _ClassVar[int]
    STAGING_BLOCKS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    OPEN_TRANSFERS_FIELD_NUMBER: _ClassVar[int]
    DELIVERIES_FIELD_NUMBER: _ClassVar[int]
    FAILED_DELIVERIES_FIELD_NUMBER: _ClassVar[int]
    STAGING_WAITS_EXHAUSTED_FIELD_NUMBER: _ClassVar[int]
    STAGING_BLOCKS_STAGED_FIELD_NUMBER: _ClassVar[int]
    STAGING_BLOCKS_SHARED_FIELD_NUMBER: _ClassVar[int]
    hits: int
    misses: int
    num_blocks: int
    num_bytes: int
    evictions: int
    capacity_bytes: int
    puts: int
    rejected_puts: int
    tiers: _containers.RepeatedCompositeFieldContainer[TierStats]
    corrupt_blocks: int
    dropped_writes: int
    staging_blocks_used: int
    staging_blocks_total: int
    open_transfers: int
    deliveries: int
    failed_deliveries: int
    staging_waits_exhausted: int
    staging_blocks_staged: int
    staging_blocks_shared: int
    def __init__(self, hits: _Optional[int] = ..., misses: _Optional[int] = ..., num_blocks: _Optional[int] = ..., num_bytes: _Optional[int] = ..., evictions: _Optional[int] = ..., capacity_bytes: _Optional[int] = ..., puts: _Optional[int] = ..., rejected_puts: _Optional[int] = ..., tiers: _Optional[_Iterable[_Union[TierStats, _Mapping]]] = ..., corrupt_blocks: _Optional[int] = ..., dropped_writes: _Optional[int] = ..., staging_blocks_used: _Optional[int] = ..., staging_blocks_total: _Optional[int] = ..., open_transfers: _Optional[int] = ..., deliveries: _Optional[int] = ..., failed_deliveries: _Optional[int] = ..., staging_waits_exhausted: _Optional[int] = ..., staging_blocks_staged: _Optional[int] = ..., staging_blocks_shared: _Optional[int] = ...) -> None: ...

class TierStats(_message.Message):
    __slots__ = ("name", "num_blocks", "num_bytes", "capacity_bytes", "hits", "evictions")
    NAME_FIELD_NUMBER: _ClassVar[int]
    NUM_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    NUM_BYTES_FIELD_NUMBER: _ClassVar[int]
    CAPACITY_BYTES_FIELD_NUMBER: _ClassVar[int]
    HITS_FIELD_NUMBER: _ClassVar[int]
    EVICTIONS_FIELD_NUMBER: _ClassVar[int]
    name: str
    num_blocks: int
    num_bytes: int
    capacity_bytes: int
    hits: int
    evictions: int
    def __init__(self, name: _Optional[str] = ..., num_blocks: _Optional[int] = ..., num_bytes: _Optional[int] = ..., capacity_bytes: _Optional[int] = ..., hits: _Optional[int] = ..., evictions: _Optional[int] = ...) -> None: ...

class PinRequest(_message.Message):
    __slots__ = ("layout", "block_hashes")
    LAYOUT_FIELD_NUMBER: _ClassVar[int]
    BLOCK_HASHES_FIELD_NUMBER: _ClassVar[int]
    layout: _common_pb2.KVLayout
    block_hashes: _containers.RepeatedScalarFieldContainer[bytes]
    def __init__(self, layout: _Optional[_Union[_common_pb2.KVLayout, _Mapping]] = ..., block_hashes: _Optional[_Iterable[bytes]] = ...) -> None: ...

class PinResponse(_message.Message):
    __slots__ = ("num_blocks",)
    NUM_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    num_blocks: int
    def __init__(self, num_blocks: _Optional[int] = ...) -> None: ...

class ClearRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ClearResponse(_message.Message):
    __slots__ = ("num_blocks_removed",)
    NUM_BLOCKS_REMOVED_FIELD_NUMBER: _ClassVar[int]
    num_blocks_removed: int
    def __init__(self, num_blocks_removed: _Optional[int] = ...) -> None: ...
