"""The SSD tier's file format: one file per block, a small fixed header, then the block's raw bytes.

    offset  size  field
    0       4     magic b"KVMB"
    4       2     format version (1)
    6       2     length of the block hash (≤ 32)
    8       16    layout digest (blake2b-128 of the serialized KV layout)
    24      32    block hash, zero padded
    56      8     xxh3_64 checksum of the data
    64      8     data length in bytes
    72      …     data

Little endian, no pickling. A file is written under a temporary name and renamed into place once whole, so a
crash leaves either the whole file or a `.tmp` that start-up deletes; a file whose bytes rot later fails its
checksum on read and is deleted, never served.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from pathlib import Path

from kvmesh.services.kv_identity import checksum

MAGIC = b"KVMB"
VERSION = 1
HEADER = struct.Struct("<4sHH16s32sQQ")
HEADER_BYTES = HEADER.size
SUFFIX = ".kvb"
TMP_SUFFIX = ".tmp"


class CorruptBlockError(Exception):
    """A block file whose header or checksum does not hold."""


@dataclass(frozen=True)
class BlockHeader:
    """The parsed header of a block file."""

    layout: bytes
    block_hash: bytes
    checksum: int
    length: int


def file_name(layout: bytes, block_hash: bytes) -> str:
    """The file a block lives in, inside the tier's directory."""
    return f"{layout.hex()}-{block_hash.hex()}{SUFFIX}"


def pack_header(layout: bytes, block_hash: bytes, crc: int, length: int) -> bytes:
    if len(layout) != 16 or not 0 < len(block_hash) <= 32:
        raise ValueError("layout digest must be 16 bytes and a block hash 1 to 32 bytes")
    return HEADER.pack(MAGIC, VERSION, len(block_hash), layout, block_hash.ljust(32, b"\0"), crc, length)


def unpack_header(raw: bytes) -> BlockHeader:
    """The header of a block file; CorruptBlockError when it is short, foreign or of another version."""
    if len(raw) < HEADER_BYTES:
        raise CorruptBlockError("short header")
    magic, version, hash_len, layout, padded, crc, length = HEADER.unpack_from(raw)
    if magic != MAGIC or version != VERSION or not 0 < hash_len <= 32:
        raise CorruptBlockError(f"bad magic/version/hash length ({magic!r}, {version}, {hash_len})")
    return BlockHeader(layout, padded[:hash_len], crc, length)


def write_block(directory: Path, layout: bytes, block_hash: bytes, data: bytes, crc: int) -> Path:
    """Write a block under a temporary name and return that path; `publish` renames it into place."""
    final = directory / file_name(layout, block_hash)
    tmp = final.with_name(f"{final.name}.{os.getpid()}.{id(data):x}{TMP_SUFFIX}")
    with open(tmp, "wb") as f:
        f.write(pack_header(layout, block_hash, crc, len(data)))
        f.write(data)
    return tmp


def publish(tmp: Path, layout: bytes, block_hash: bytes) -> Path:
    """Atomically make a written block file visible under its final name."""
    final = tmp.parent / file_name(layout, block_hash)
    os.replace(tmp, final)
    return final


def read_block(path: Path, layout: bytes, block_hash: bytes) -> bytes:
    """The data of a block file, verified against its header and checksum; CorruptBlockError otherwise."""
    with open(path, "rb") as f:
        raw = f.read()
    header = unpack_header(raw)
    data = raw[HEADER_BYTES:]
    if header.layout != layout or header.block_hash != block_hash:
        raise CorruptBlockError(f"{path.name} holds another block")
    if len(data) != header.length or checksum(data) != header.checksum:
        raise CorruptBlockError(f"{path.name} fails its checksum (torn or corrupt)")
    return data


def scan(directory: Path) -> list[tuple[Path, BlockHeader]]:
    """Every plausible block file in directory (header sane, size matching), oldest first by mtime.

    Deletes leftovers of interrupted writes and files whose header or size is wrong. Checksums are verified when a
    block is read, so start-up stays fast on a large tier.
    """
    found = []
    for path in directory.iterdir():
        if path.name.endswith(TMP_SUFFIX):
            path.unlink(missing_ok=True)
            continue
        if not path.name.endswith(SUFFIX):
            continue
        try:
            stat = path.stat()
            with open(path, "rb") as f:
                header = unpack_header(f.read(HEADER_BYTES))
            if stat.st_size != HEADER_BYTES + header.length or path.name != file_name(header.layout,
                                                                                     header.block_hash):
                raise CorruptBlockError("size or name does not match the header")
        except (OSError, CorruptBlockError):
            path.unlink(missing_ok=True)
            continue
        found.append((stat.st_mtime_ns, path, header))
    found.sort(key=lambda item: item[0])
    return [(path, header) for _, path, header in found]
