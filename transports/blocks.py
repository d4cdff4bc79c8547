"""Block-id arithmetic and checksums shared by senders and receivers (pure functions, no I/O)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Iterator, Sequence

import numpy as np
import xxhash


@dataclass(frozen=True)
class Run:
    """Consecutive blocks of one layer, K or V: `src` is the sender's bytes, shaped [num_blocks, block_nbytes]."""

    layer: int
    kv: int
    dst_start: int
    src: np.ndarray

    @property
    def num_blocks(self) -> int:
        """Blocks in the run."""
        return self.src.shape[0]

    @property
    def nbytes(self) -> int:
        """Bytes in the run."""
        return self.src.nbytes


def as_block_ids(block_ids: Sequence[int] | np.ndarray, num_blocks: int, what: str) -> np.ndarray:
    """Block ids as an int64 array; ValueError when empty, not 1-D, or out of [0, num_blocks)."""
    ids = np.asarray(block_ids, dtype=np.int64)
    if ids.ndim != 1 or ids.size == 0:
        raise ValueError(f"{what}: need a non-empty list of block ids")
    if ids.min() < 0 or ids.max() >= num_blocks:
        raise ValueError(f"{what}: block ids must be in [0, {num_blocks}), got {ids.min()}..{ids.max()}")
    return ids


def paired_runs(src_ids: np.ndarray, dst_ids: np.ndarray) -> list[tuple[int, int, int]]:
    """Split (src, dst) pairs into maximal runs where both advance by one: [(src_start, dst_start, count)]."""
    breaks = np.flatnonzero((np.diff(src_ids) != 1) | (np.diff(dst_ids) != 1)) + 1
    starts = np.concatenate(([0], breaks))
    ends = np.concatenate((breaks, [src_ids.size]))
    return [(int(src_ids[s]), int(dst_ids[s]), int(e - s)) for s, e in zip(starts, ends)]


def dst_runs(dst_ids: np.ndarray) -> list[tuple[int, int]]:
    """Maximal runs of consecutive ids, in order: [(start, count)]."""
    return [(d, n) for _, d, n in paired_runs(dst_ids, dst_ids)]


def layer_runs(pool: np.ndarray, layer: int, src_ids: np.ndarray, dst_ids: np.ndarray) -> list[Run]:
    """The runs that carry one layer (K runs, then V runs), each a zero-copy view of the sender's pool."""
    pairs = paired_runs(src_ids, dst_ids)
    return [Run(layer, kv, d, pool[layer, kv, s:s + n]) for kv in (0, 1) for s, d, n in pairs]


def layer_checksum(pieces: Iterator[np.ndarray]) -> int:
    """xxh3_64 over the pieces' bytes in order (each piece a C-contiguous array)."""
    h = xxhash.xxh3_64()
    for piece in pieces:
        h.update(piece.reshape(-1).data)
    return h.intdigest()


def src_checksum(runs: list[Run]) -> int:
    """A layer's checksum from the sender's runs (runs are in dst order: K runs, then V runs)."""
    return layer_checksum(r.src for r in runs)


def dst_checksums(pool: np.ndarray, dst_ids: np.ndarray, num_layers: int,
                  layers: Iterable[int] | None = None, runs: list[tuple[int, int]] | None = None) -> list[int]:
    """Each layer's checksum (of `layers`, default all) from the receiver's pool: K then V bytes of the blocks,
    in dst order. `runs`: `dst_runs(dst_ids)`, if the caller has it already."""
    runs = dst_runs(dst_ids) if runs is None else runs
    return [layer_checksum(pool[layer, kv, d:d + n] for kv in (0, 1) for d, n in runs)
            for layer in (range(num_layers) if layers is None else layers)]
