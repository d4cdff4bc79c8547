"""The memory a transport moves KV in and out of: a worker's whole KV pool, and the facts that describe it.

A pool is ONE numpy uint8 array shaped [num_layers, 2, num_blocks, block_nbytes] (axis 1: 0 = K, 1 = V). One
block of one layer is one contiguous run of bytes and consecutive block ids are contiguous, so a run of blocks is a
single memcpy. Transports allocate the pool (`allocate_region`, in the registry: a backend may need its own kind
of memory); the engine wraps `region.array` without copying. This module is a leaf: it imports nothing of the
package.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from kvmesh.v1 import common_pb2

DTYPE_SIZES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclass
class KVRegion:
    """A KV pool and whoever owns its memory. `close()` releases it (for shm: unmaps and unlinks the segment)."""

    array: np.ndarray
    backend: str = "local"  # whose memory it is: "local" (process memory) or the backend that made it
    name: str = ""  # shm segment name when the pool lives in shared memory
    path: str = ""  # the file other processes of this host map the pool by (a shared segment's), if any
    _closer: Callable[[], None] | None = field(default=None, repr=False)

    @property
    def num_layers(self) -> int:
        """Layers of the pool."""
        return self.array.shape[0]

    @property
    def num_blocks(self) -> int:
        """Blocks of the pool."""
        return self.array.shape[2]

    @property
    def block_nbytes(self) -> int:
        """Bytes of one block of K (or V) in one layer."""
        return self.array.shape[3]

    def close(self) -> None:
        """Release the memory. Idempotent; views of `array` held elsewhere stay readable until dropped."""
        closer, self._closer = self._closer, None
        if closer is not None:
            closer()


def make_layout(num_layers: int, block_size: int, num_kv_heads: int, head_dim: int, dtype: str = "bfloat16",
                model_id: str = "") -> common_pb2.KVLayout:
    """A KVLayout message (shorthand for tests and tools)."""
    return common_pb2.KVLayout(model_id=model_id, dtype=dtype, block_size=block_size, num_layers=num_layers,
                               num_kv_heads=num_kv_heads, head_dim=head_dim)


def block_nbytes(layout: common_pb2.KVLayout) -> int:
    """Bytes of one block of K (or V) in one layer under `layout`."""
    if layout.dtype not in DTYPE_SIZES:
        raise ValueError(f"unknown KV dtype {layout.dtype!r}; expected one of {sorted(DTYPE_SIZES)}")
    return layout.block_size * layout.num_kv_heads * layout.head_dim * DTYPE_SIZES[layout.dtype]


def check_region(region: KVRegion, layout: common_pb2.KVLayout) -> None:
    """Raise ValueError unless `region` is a uint8 pool shaped for `layout`."""
    a = region.array
    if a.dtype != np.uint8 or a.ndim != 4 or a.shape[1] != 2 or not a.flags.c_contiguous:
        raise ValueError(f"a KV region must be a C-contiguous uint8 [layers, 2, blocks, bytes] array, "
                         f"got {a.dtype} {a.shape}")
    want = (layout.num_layers, block_nbytes(layout))
    if (a.shape[0], a.shape[3]) != want:
        raise ValueError(f"region shape {a.shape} does not fit layout (layers, block bytes) = {want}")


def host_id() -> str:
    """A stable id of this host: $KVMESH_HOST_ID, else hostname + kernel boot id (equal ids share /dev/shm)."""
    forced = os.environ.get("KVMESH_HOST_ID")
    if forced:
        return forced
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
    except OSError:
        boot = "noboot"
    return f"{socket.gethostname()}/{boot}"
