"""The "ucx" backend: one-sided RDMA-style WRITEs through NIXL (its UCX plugin) into the receiver's registered
region; completion and checksums go over the control channel like every other backend. A layer of at least
EARLY_VERIFY_BYTES carries a NIXL notification, which NIXL delivers only once the write's data is in place, so the
receiver verifies that layer while later ones are written (as LayerWritten does for shm).

The receiver registers its whole pool once (at `Receiver` start) and publishes its NIXL agent metadata and the
pool's base address in the descriptor. The sender registers its own pool once, loads the receiver's metadata once
per receiver, and for each layer posts one WRITE whose descriptor list has one entry per run of blocks, without
waiting for it; the Commit follows once every WRITE completed. Needs the
`kvmesh[ucx]` extra (`nixl-cu12`); reports itself unavailable otherwise. On hosts without RDMA NIC, UCX uses
shared memory or TCP.
"""

from __future__ import annotations

import asyncio
import importlib
import os
import secrets
import struct

import numpy as np

import kvmesh.transports.errors as errors
from kvmesh.transports.base import EARLY_VERIFY_BYTES, Attachment, Backend
from kvmesh.transports.blocks import Run
from kvmesh.transports.transfer import Transfer

NAME = "ucx"  # this backend's registry name
STATE = "ucx.agent"  # its per-sender state (see Sender.state)
_ADDR = struct.Struct("<Q")  # backend_params["ucx"] = base address of the receiver's pool, then agent metadata
POLL_S = (0.0, 0.0001, 0.0005, 0.001)  # completion polling back-off


def _nixl():
    """NIXL's Python module: $KVMESH_NIXL_MODULE if set (e.g. `nixl` for a source build against the cluster's
    own UCX), else the PyPI wheel's `nixl_cu12`, else `nixl`."""
    forced = os.environ.get("KVMESH_NIXL_MODULE")
    if forced:
        return importlib.import_module(forced)
    try:
        import nixl_cu12 as nixl
    except ImportError:
        import nixl  # a source build names the module nixl
    return nixl


def _new_agent():
    nixl = _nixl()
    return nixl.nixl_agent(f"kvmesh-{os.getpid()}-{secrets.token_hex(4)}",
                           nixl.nixl_agent_config(enable_prog_thread=False, backends=["UCX"]))


_process_agent = None  # one NIXL agent per process for every Sender (creating one costs ~0.5 s)


def _sender_agent():
    global _process_agent
    if _process_agent is None:
        _process_agent = _new_agent()
    return _process_agent


def _register(agent, array: np.ndarray):
    return agent.register_memory([(array.ctypes.data, array.nbytes, 0, "")], "DRAM")


class SenderAgent:
    """A sender's side of NIXL: the process's agent and the sender's pool registered with it (once per Sender,
    as its `Sender.state`); `close` deregisters the pool, which may be freed after the sender closes."""

    def __init__(self, pool: np.ndarray) -> None:
        self.agent = _sender_agent()
        self.registered = _register(self.agent, pool)

    def close(self) -> None:
        """Called by `Sender.close` after every link closed."""
        if self.registered is not None:
            self.agent.deregister_memory(self.registered)
            self.registered = None


class UcxTransfer(Transfer):
    """Posts one NIXL WRITE per layer (a descriptor per run) and returns at once; `_end` waits for them all. Layers
    stream out back to back instead of each waiting for the previous one's completion round trip."""

    _inflight: list | None = None  # (handle, scratch registrations) of posted WRITEs
    _driver: asyncio.Task | None = None  # progresses them between layers (see _drive)

    async def _write(self, runs: list[Run], hasher=None) -> None:
        if not runs:
            return
        agent, link = self.link.agent, self.link
        scratch = [r.src for r in runs if not _inside(r.src, self.pool)]  # e.g. chaos' altered copies
        registered = [_register(agent, a) for a in scratch]
        local = np.array([(r.src.ctypes.data, r.nbytes, 0) for r in runs], dtype=np.uint64).reshape(-1, 3)
        remote = np.array([(link.remote_addr(r), r.nbytes, 0) for r in runs], dtype=np.uint64).reshape(-1, 3)
        nbytes = sum(r.nbytes for r in runs)
        early = nbytes >= EARLY_VERIFY_BYTES and len(self.layer_checksums) < self.pool.shape[0] - 1
        notif = _notif(self.transfer_id, runs[0].layer) if early else b""  # not the last: Commit checks it
        handle = None
        try:
            handle = agent.initialize_xfer("WRITE", agent.get_xfer_descs(local, "DRAM"),
                                           agent.get_xfer_descs(remote, "DRAM"), link.remote_name, notif)
            state = agent.transfer(handle)
        except Exception as exc:  # NIXL raises its own types (nixlRemoteDisconnectError, ...)
            self._release(agent, handle, registered)
            raise errors.PeerUnavailable(f"transfer {self.transfer_id}: {type(exc).__name__}: {exc}") from None
        if self._inflight is None:
            self._inflight = []
        self._inflight.append((handle, registered))
        if state not in ("PROC", "DONE"):
            raise errors.PeerUnavailable(f"transfer {self.transfer_id}: NIXL write ended {state}")
        if self._driver is None or self._driver.done():
            self._driver = asyncio.get_running_loop().create_task(self._drive())

    async def _drive(self) -> None:
        """Progress the posted WRITEs while the next layers compute. There is no NIXL progress thread (it spins a
        whole core), and a large WRITE (UCX's rendezvous) moves only while the sender's side is progressed: without
        this a layer would land, and its notification reach the receiver, only at the Commit's flush. Only polls;
        `_flush` collects and releases the handles (same event loop: never one this is using)."""
        polls = 0
        while self._inflight:
            try:  # the newest WRITE: progressing the agent moves every posted one
                if self.link.agent.check_xfer_state(self._inflight[-1][0]) != "PROC":
                    return  # landed (the next _write drives again), or failed: _flush reports it
            except Exception:
                return
            await asyncio.sleep(POLL_S[min(polls, len(POLL_S) - 1)])
            polls += 1

    def _stop_driving(self) -> None:
        if self._driver is not None:
            self._driver.cancel()
            self._driver = None

    async def _flush(self) -> None:
        """Wait until every posted WRITE completed (NIXL's DONE: the data is at the target)."""
        self._stop_driving()
        agent, polls = self.link.agent, 0
        while self._inflight:
            handle, registered = self._inflight[0]
            try:
                state = agent.check_xfer_state(handle)
            except Exception as exc:
                raise errors.PeerUnavailable(f"transfer {self.transfer_id}: {type(exc).__name__}: {exc}") from None
            if state == "DONE":
                self._release(agent, *self._inflight.pop(0))
                continue
            if state != "PROC":
                raise errors.PeerUnavailable(f"transfer {self.transfer_id}: NIXL write ended {state}")
            await asyncio.sleep(POLL_S[min(polls, len(POLL_S) - 1)])
            polls += 1

    async def _cancel(self) -> None:
        self._stop_driving()
        agent = self.link.agent
        for handle, registered in self._inflight or []:  # NIXL aborts a still-running write on release
            self._release(agent, handle, registered)
        self._inflight = None

    @staticmethod
    def _release(agent, handle, registered) -> None:
        if handle is not None:
            try:  # a dead peer may make this fail too; there is nothing else to release
                agent.release_xfer_handle(handle)
            except Exception:
                pass
        for descs in registered:
            agent.deregister_memory(descs)


class UcxBackend(Backend):
    """One-sided NIXL/UCX WRITEs into the receiver's registered region."""

    name = NAME
    one_sided = True
    transfer_class = UcxTransfer
    agent = None  # the NIXL agent, once connected

    @classmethod
    def unavailable_reason(cls) -> str | None:
        try:
            _nixl()
        except ImportError:
            return "NIXL is not installed (pip install 'kvmesh[ucx]', i.e. nixl-cu12)"
        return None

    @classmethod
    def attach(cls, receiver):
        agent = _new_agent()
        descs = _register(agent, receiver.region.array)

        def close() -> None:
            agent.deregister_memory(descs)

        def progress() -> None:  # drives NIXL, and starts verifying each layer a notification says is in place
            for messages in agent.get_new_notifs().values():
                for message in messages:
                    parsed = _parse_notif(message)
                    if parsed is not None:
                        receiver.on_layer_written(*parsed)

        # No NIXL progress thread (it spins a whole core); the receiver polls while a ucx transfer is open.
        return Attachment(params=_ADDR.pack(receiver.region.array.ctypes.data) + agent.get_agent_metadata(),
                          close=close, progress=progress)

    async def connect(self) -> None:
        sender = self.sender
        self.agent = sender.state(STATE, lambda: SenderAgent(sender.region.array)).agent
        params = bytes(self.descriptor.backend_params[NAME])
        (self.base,) = _ADDR.unpack_from(params)
        self.remote_name = self.agent.add_remote_agent(params[_ADDR.size:])
        block = sender.region.block_nbytes
        self.strides = (2 * self.descriptor.num_blocks * block, self.descriptor.num_blocks * block, block)

    def remote_addr(self, run: Run) -> int:
        """Address of the run's first block in the receiver's pool."""
        layer, kv, block = self.strides
        return self.base + run.layer * layer + run.kv * kv + run.dst_start * block

    async def close(self) -> None:
        if self.agent is not None and getattr(self, "remote_name", None):
            try:
                self.agent.remove_remote_agent(self.remote_name)
            except Exception:  # the remote may be gone already; nothing else to release
                pass


def _notif(transfer_id: str, layer: int) -> bytes:
    return f"kvmesh-layer\0{transfer_id}\0{layer}".encode()


def _parse_notif(message: bytes) -> tuple[str, int] | None:
    """(transfer id, layer) of one of our layer notifications; None for anything else (a hint: never trusted
    beyond "verify this layer now", which is checked against the record anyway)."""
    parts = bytes(message).split(b"\0")
    if len(parts) != 3 or parts[0] != b"kvmesh-layer" or not parts[2].isdigit():
        return None
    try:
        return parts[1].decode(), int(parts[2])
    except UnicodeDecodeError:
        return None


def _inside(array: np.ndarray, pool: np.ndarray) -> bool:
    start, base = array.ctypes.data, pool.ctypes.data
    return base <= start and start + array.nbytes <= base + pool.nbytes
