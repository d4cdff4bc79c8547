"""Shared-memory segments of the "shm" backend: receivers' pools and senders' staging areas.

Segments are named `kvmesh-<owner pid>-<random>` in /dev/shm. The owner unlinks its segments on close, at exit and
on SIGTERM/SIGINT/SIGHUP (when those still have their default handlers); `reclaim_stale_segments()` (call when a
worker starts) unlinks segments whose owner died without cleaning up. We use os.open + mmap rather than
multiprocessing.shared_memory, whose resource tracker unlinks segments it did not create.
"""

from __future__ import annotations

import atexit
import mmap
import os
import re
import secrets
import signal
import threading

import numpy as np

from kvmesh.transports.region import KVRegion

SHM_DIR = "/dev/shm"
PREFIX = "kvmesh-"
#: A kvmesh segment's name; group 1 is its owner's pid.
SEGMENT_NAME = re.compile(r"\Akvmesh-(\d+)-[0-9a-f]+\Z")  # \Z: no trailing newline slips through
_owned: set[str] = set()  # segments this process created and has not unlinked yet
_lock = threading.Lock()
_hooks_installed = False


def segment_path(name: str) -> str:
    """The file of a kvmesh segment; ValueError for a name that is not one (so a peer cannot name other files)."""
    if not SEGMENT_NAME.match(name):
        raise ValueError(f"not a kvmesh segment name: {name!r}")
    return os.path.join(SHM_DIR, name)


def _map(fd: int, nbytes: int) -> mmap.mmap:
    return mmap.mmap(fd, nbytes, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE)


def create_segment(shape: tuple[int, ...]) -> KVRegion:
    """A new shm segment holding a zeroed uint8 array of `shape`, owned (and later unlinked) by this process."""
    name = f"{PREFIX}{os.getpid()}-{secrets.token_hex(6)}"
    nbytes = int(np.prod(shape))
    fd = os.open(segment_path(name), os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        _track(name)
        os.ftruncate(fd, nbytes)
        mem = _map(fd, nbytes)
    except BaseException:
        unlink_segment(name)
        raise
    finally:
        os.close(fd)
    array = np.frombuffer(mem, dtype=np.uint8).reshape(shape)

    def close() -> None:
        unlink_segment(name)
        close_map(mem)

    return KVRegion(array=array, backend="shm", name=name, path=segment_path(name), _closer=close)


def open_segment(name: str, shape: tuple[int, ...]) -> tuple[np.ndarray, mmap.mmap]:
    """Map another process's segment read-write as a uint8 array of `shape` (the sender's side)."""
    fd = os.open(segment_path(name), os.O_RDWR)
    try:
        nbytes = int(np.prod(shape))
        if os.fstat(fd).st_size < nbytes:
            raise ValueError(f"segment {name} is smaller than {shape}")
        mem = _map(fd, nbytes)
    finally:
        os.close(fd)
    return np.frombuffer(mem, dtype=np.uint8).reshape(shape), mem


def unlink_segment(name: str) -> None:
    """Remove a segment's name (mappings stay valid until unmapped). Idempotent."""
    with _lock:
        _owned.discard(name)
    try:
        os.unlink(segment_path(name))
    except FileNotFoundError:
        pass


def list_segments() -> list[str]:
    """Names of every kvmesh segment in /dev/shm (any owner)."""
    try:
        return sorted(n for n in os.listdir(SHM_DIR) if SEGMENT_NAME.match(n))
    except FileNotFoundError:
        return []


def reclaim_stale_segments() -> list[str]:
    """Unlink kvmesh segments whose owner process is dead; returns their names. Call when a worker starts."""
    reclaimed = []
    for name in list_segments():
        if not owner_alive(int(SEGMENT_NAME.match(name).group(1))):
            unlink_segment(name)
            reclaimed.append(name)
    return reclaimed


def owner_alive(pid: int) -> bool:
    """Whether the process that owns a segment (its pid) still runs."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def close_map(mem: mmap.mmap) -> None:
    """Unmap a segment, unless views of it are still exported (it then goes when they do)."""
    try:
        mem.close()
    except BufferError:  # numpy views still exported (e.g. the engine's); the mapping goes when they do
        pass


def _track(name: str) -> None:
    global _hooks_installed
    with _lock:
        _owned.add(name)
        if _hooks_installed:
            return
        _hooks_installed = True
    atexit.register(_unlink_owned)
    if threading.current_thread() is threading.main_thread():
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            if signal.getsignal(signum) is signal.SIG_DFL:
                signal.signal(signum, _on_signal)


def _unlink_owned() -> None:
    for name in list(_owned):
        unlink_segment(name)


def _on_signal(signum, frame) -> None:
    for name in list(_owned):  # no lock: the interrupted code may hold it
        try:
            os.unlink(os.path.join(SHM_DIR, name))
        except OSError:
            pass
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)


