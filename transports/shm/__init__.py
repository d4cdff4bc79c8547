"""The "shm" backend: same-host one-sided copies into the receiver's shared-memory pool (backend.py), its segments
(segment.py), and the staged protocol for small transfers (staging.py)."""

from kvmesh.transports.shm.backend import ShmBackend, ShmTransfer, staging_area
from kvmesh.transports.shm.segment import (SEGMENT_NAME, SHM_DIR, create_segment, list_segments, open_segment,
                                           reclaim_stale_segments, unlink_segment)
from kvmesh.transports.shm.staging import StagedMaps, StagedTransfer, StagingArea

__all__ = ["SEGMENT_NAME", "SHM_DIR", "ShmBackend", "ShmTransfer", "StagedMaps", "StagedTransfer", "StagingArea",
           "create_segment", "list_segments", "open_segment", "reclaim_stale_segments", "staging_area",
           "unlink_segment"]
