"""Cache tiers behind one small interface. The base class does the shared work once (validation, counters,
keeping within the byte budget); a tier implements only the private hooks that differ.

An SSD tier comes later: one class here, one line in TIERS.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Hashable, Iterator

from kvmesh.services.common.errors import CapacityError, InvalidArgumentError

Key = Hashable


class Tier(ABC):
    """A bounded block store with least-recently-used eviction. Never holds more than capacity_bytes."""

    name = "tier"

    def __init__(self, capacity_bytes: int) -> None:
        if capacity_bytes <= 0:
            raise InvalidArgumentError(f"a tier's capacity must be positive, got {capacity_bytes}")
        self.capacity_bytes = capacity_bytes
        self.num_bytes = 0
        self.num_evictions = 0

    def contains(self, key: Key) -> bool:
        """Whether the block is held (does not count as a use)."""
        return self._contains(key)

    def get(self, key: Key) -> bytes | None:
        """The block's bytes, marking it most recently used; None when it is not held."""
        return self._get(key)

    def put(self, key: Key, data: bytes) -> tuple[bool, int]:
        """Store a block whole, evicting the least recently used until it fits. Returns (stored, num_evicted);
        stored is False when the block was already held (then only its recency changes)."""
        if not data:
            raise InvalidArgumentError("a block must not be empty")
        if len(data) > self.capacity_bytes:
            raise CapacityError(f"block of {len(data)} bytes exceeds the {self.name} tier's "
                                f"{self.capacity_bytes}-byte budget")
        if self._get(key) is not None:
            return False, 0
        evicted = 0
        while self.num_bytes + len(data) > self.capacity_bytes:
            self.num_bytes -= self._evict_oldest()
            evicted += 1
        self._store(key, data)
        self.num_bytes += len(data)
        self.num_evictions += evicted
        return True, evicted

    def clear(self) -> int:
        """Drop every block; return how many there were."""
        count = len(self)
        self._clear()
        self.num_bytes = 0
        return count

    @abstractmethod
    def __len__(self) -> int:
        """Blocks held."""

    @abstractmethod
    def _contains(self, key: Key) -> bool: ...

    @abstractmethod
    def _get(self, key: Key) -> bytes | None:
        """Return the block and mark it most recently used."""

    @abstractmethod
    def _store(self, key: Key, data: bytes) -> None:
        """Insert a block known to be absent and to fit; it becomes the most recently used."""

    @abstractmethod
    def _evict_oldest(self) -> int:
        """Remove the least recently used block; return its size."""

    @abstractmethod
    def _clear(self) -> None: ...


class DramTier(Tier):
    """Blocks in process memory, in an ordered dict kept in recency order (oldest first)."""

    name = "dram"

    def __init__(self, capacity_bytes: int) -> None:
        super().__init__(capacity_bytes)
        self._blocks: OrderedDict[Key, bytes] = OrderedDict()

    def __len__(self) -> int:
        return len(self._blocks)

    def __iter__(self) -> Iterator[Key]:
        return iter(self._blocks)

    def _contains(self, key: Key) -> bool:
        return key in self._blocks

    def _get(self, key: Key) -> bytes | None:
        data = self._blocks.get(key)
        if data is not None:
            self._blocks.move_to_end(key)
        return data

    def _store(self, key: Key, data: bytes) -> None:
        self._blocks[key] = data

    def _evict_oldest(self) -> int:
        _, data = self._blocks.popitem(last=False)
        return len(data)

    def _clear(self) -> None:
        self._blocks.clear()


TIERS: dict[str, type[Tier]] = {
    "dram": DramTier,
}
