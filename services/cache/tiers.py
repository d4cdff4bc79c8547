"""Cache tiers behind one small interface. The base class keeps the recency order and the byte budget once;
a tier implements only how a block's payload is kept (`_keep`) and dropped (`_drop`).

Eviction is least-recently-used among the blocks the caller does not protect (pinned, or leased to a reader).
The store touches a chain's blocks tail first, so within a chain the head is always the most recent: eviction
takes the tails of prefixes first and never orphans a block whose predecessors are gone (an orphan is useless,
since a lookup stops at the first missing block).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterator
from pathlib import Path
from typing import Any

from kvmesh.services.cache import blockfile
from kvmesh.services.common.errors import InvalidArgumentError

Key = Hashable
Protected = Callable[[Key], bool]


class Tier(ABC):
    """A bounded block store with LRU eviction. Never holds more than capacity_bytes."""

    name = "tier"

    def __init__(self, capacity_bytes: int) -> None:
        if capacity_bytes <= 0:
            raise InvalidArgumentError(f"a tier's capacity must be positive, got {capacity_bytes}")
        self.capacity_bytes = capacity_bytes
        self.num_bytes = 0
        self.num_evictions = 0
        self._sizes: OrderedDict[Key, int] = OrderedDict()  # oldest first

    def __len__(self) -> int:
        return len(self._sizes)

    def __iter__(self) -> Iterator[Key]:
        return iter(list(self._sizes))

    def contains(self, key: Key) -> bool:
        """Whether the block is held (not a use)."""
        return key in self._sizes

    def touch(self, key: Key) -> None:
        """Mark a held block most recently used."""
        if key in self._sizes:
            self._sizes.move_to_end(key)

    def put(self, key: Key, payload: Any, num_bytes: int, protected: Protected | None = None) -> list[Key] | None:
        """Keep a block, evicting unprotected least recently used blocks until it fits.

        Returns the evicted keys, [] when the block was already held (only its recency changes), or None when it
        cannot fit even after evicting every unprotected block (then nothing is evicted).
        """
        if num_bytes <= 0:
            raise InvalidArgumentError("a block must not be empty")
        if key in self._sizes:
            self.touch(key)
            return []
        victims = self._victims(num_bytes, protected or (lambda _key: False))
        if victims is None:
            return None
        for victim in victims:
            self.remove(victim)
        self.num_evictions += len(victims)
        self._keep(key, payload)
        self._sizes[key] = num_bytes
        self.num_bytes += num_bytes
        return victims

    def _victims(self, num_bytes: int, protected: Protected) -> list[Key] | None:
        need = self.num_bytes + num_bytes - self.capacity_bytes
        victims: list[Key] = []
        for key, size in self._sizes.items():
            if need <= 0:
                break
            if not protected(key):
                victims.append(key)
                need -= size
        return victims if need <= 0 else None

    def remove(self, key: Key) -> bool:
        """Drop a block; False when it was not held."""
        size = self._sizes.pop(key, None)
        if size is None:
            return False
        self.num_bytes -= size
        self._drop(key)
        return True

    def clear(self) -> int:
        """Drop every block; return how many there were."""
        keys = list(self._sizes)
        for key in keys:
            self.remove(key)
        return len(keys)

    @abstractmethod
    def _keep(self, key: Key, payload: Any) -> None:
        """Hold a new block's payload (known absent and fitting)."""

    @abstractmethod
    def _drop(self, key: Key) -> None:
        """Release a block's payload."""


class DramTier(Tier):
    """Blocks as bytes objects in process memory."""

    name = "dram"

    def __init__(self, capacity_bytes: int) -> None:
        super().__init__(capacity_bytes)
        self._blocks: dict[Key, bytes] = {}

    def read(self, key: Key) -> bytes | None:
        """The block's bytes (not a use), or None."""
        return self._blocks.get(key)

    def _keep(self, key: Key, payload: bytes) -> None:
        self._blocks[key] = payload

    def _drop(self, key: Key) -> None:
        del self._blocks[key]


class SsdTier(Tier):
    """Blocks as files in a directory (format in blockfile.py); keys are (layout digest, block hash).

    The payload given to `put` is the path of a block already written under a temporary name (`stage`): keeping
    it is one rename, so the index changes only in fast steps and the disk writes happen elsewhere.
    """

    name = "ssd"

    def __init__(self, capacity_bytes: int, directory: str | Path) -> None:
        super().__init__(capacity_bytes)
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.num_corrupt = 0

    def recover(self) -> int:
        """Index the blocks already on disk (oldest first), dropping broken files and any beyond the budget."""
        for path, header in blockfile.scan(self.directory):
            key = (header.layout, header.block_hash)
            if self.put(key, None, header.length) is None:
                path.unlink(missing_ok=True)
        return len(self)

    def stage(self, key: Key, data: bytes, crc: int) -> Path:
        """Write a block's file under a temporary name (slow: the caller does this off the event loop)."""
        layout, block_hash = key
        return blockfile.write_block(self.directory, layout, block_hash, data, crc)

    def path(self, key: Key) -> Path:
        layout, block_hash = key
        return self.directory / blockfile.file_name(layout, block_hash)

    def read(self, key: Key) -> bytes:
        """The block's verified bytes; CorruptBlockError (or OSError) when the file is torn, corrupt or gone."""
        layout, block_hash = key
        return blockfile.read_block(self.path(key), layout, block_hash)

    def _keep(self, key: Key, payload: Path | None) -> None:
        if payload is not None:  # None: recovered, already in place
            layout, block_hash = key
            blockfile.publish(payload, layout, block_hash)

    def _drop(self, key: Key) -> None:
        self.path(key).unlink(missing_ok=True)


TIERS: dict[str, type[Tier]] = {
    "dram": DramTier,
    "ssd": SsdTier,
}
