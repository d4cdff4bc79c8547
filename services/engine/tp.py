"""Tensor parallelism inside one engine: rank 0 (the driver, the process the user started) spawns N-1 follower
processes, and every rank holds 1/N of each layer's heads and MLP columns (tp_shard.py) plus its own KV pool of
its KV-head slice.

Each step the driver broadcasts the batch as int64 tensors (tp_wire.py: an [op, length] header, then the
payload), every rank runs the same forward pass (one all-reduce after o_proj and one after down_proj, in
model.py), and the driver alone samples: lm_head is replicated, so its logits are whole. torch.distributed over
gloo on the CPU, NCCL on CUDA (rank r on cuda:r); the rendezvous is a TCP store on 127.0.0.1 at a free port.

Followers end when the driver says stop, and on their own when the driver process is gone (a watchdog polls the
parent pid; a collective with a dead peer fails too), so a killed driver leaves no orphans.
"""

from __future__ import annotations

import atexit
import logging
import os
import threading
from pathlib import Path

import torch

from kvmesh.services.engine.errors import RankFailedError, UnsupportedModelError
from kvmesh.services.engine.tp_comm import (OP_STEP, OP_STOP, backend_for, broadcast_step, free_port, init_group,
                                            rank_device)
from kvmesh.services.engine.tp_load import follower_main, load_rank_model
from kvmesh.services.engine.tp_wire import encode_batch

log = logging.getLogger(__name__)


class TPGroup:
    """The driver's handle on its follower ranks: start them, send each step, stop them."""

    def __init__(self, device: str, size: int):
        self.device, self.size = device, size
        self.comm_device = rank_device(device, 0) if backend_for(device) == "nccl" else "cpu"
        self.port = free_port()
        self.followers = []
        self._closed = False

    def spawn(self, path: str, dtype: str, block_size: int, num_blocks: int,
              shared: torch.Tensor | str | None = None) -> None:
        """Start ranks 1..N-1: each loads its own shard and maps the shared pool (or makes its own: see
        tp_load.rank_pool), then waits for the group (`join`)."""
        import torch.distributed as dist
        import torch.multiprocessing as mp

        if dist.is_initialized():
            raise UnsupportedModelError("this process already runs a tensor-parallel group; one engine with "
                                        "--tensor-parallel-size > 1 per process")
        if backend_for(self.device) == "nccl" and torch.cuda.device_count() < self.size:
            raise UnsupportedModelError(f"--tensor-parallel-size {self.size} on {self.device} needs {self.size} "
                                        f"GPUs, one per rank; this machine has {torch.cuda.device_count()}")
        ctx = mp.get_context("spawn")
        threads = int(os.environ.get("KVMESH_TORCH_THREADS") or max(1, (os.cpu_count() or 1) // self.size))
        for rank in range(1, self.size):
            p = ctx.Process(target=follower_main, name=f"kvmesh-tp-rank{rank}", daemon=True,
                            args=(str(path), dtype, self.device, block_size, num_blocks, rank, self.size, self.port,
                                  os.getpid(), threads, shared))
            p.start()
            self.followers.append(p)
        atexit.register(self.close)

    def join(self) -> None:
        """Join the group as rank 0, giving up (and stopping the others) if a follower dies before it joins."""
        joined, errors = threading.Event(), []

        def join():
            try:
                init_group(self.device, 0, self.size, self.port)
            except Exception as e:  # noqa: BLE001 - handed to the caller below
                errors.append(e)
            joined.set()

        threading.Thread(target=join, name="tp-join", daemon=True).start()
        while not joined.wait(0.2):
            dead = [(p.name, p.exitcode) for p in self.followers if p.exitcode is not None]
            if dead:
                self._closed = True
                self._stop_followers(grace_s=0)
                raise UnsupportedModelError(f"tensor-parallel rank {dead[0][0]} exited with code {dead[0][1]} "
                                            "before joining the group; its error is in the log above")
        if errors:
            self._closed = True
            self._stop_followers(grace_s=0)
            raise errors[0]

    def step(self, payload: torch.Tensor) -> None:
        broadcast_step(OP_STEP, payload, self.comm_device)

    def check_followers(self, cause: Exception) -> None:
        """Raise RankFailedError if a follower has exited (the cause of a failed collective)."""
        import torch.distributed as dist

        for p in self.followers:  # a peer's reset socket can reach us just before its exit status does
            p.join(timeout=2)
        dead = [(p.name, p.exitcode) for p in self.followers if p.exitcode is not None]
        if dead:
            self._closed = True
            self._stop_followers(grace_s=0)
            try:
                dist.destroy_process_group()
            except (RuntimeError, ValueError) as e:
                log.warning("tensor-parallel group did not close: %s", e)
            raise RankFailedError(f"tensor-parallel rank {dead[0][0]} exited with code {dead[0][1]}; the engine "
                                  "cannot step without it (restart it)") from cause

    def close(self) -> None:
        """Tell the followers to stop and wait for them (idempotent); a follower that hangs is killed."""
        import torch.distributed as dist

        if self._closed:
            return
        self._closed = True
        try:
            if dist.is_initialized():
                broadcast_step(OP_STOP, None, self.comm_device)
                dist.destroy_process_group()
        except RuntimeError as e:  # a follower already died: nothing left to tell
            log.warning("tensor-parallel group did not stop cleanly: %s", e)
        self._stop_followers()

    def _stop_followers(self, grace_s: float = 30) -> None:
        for p in self.followers:
            p.join(timeout=grace_s)
            if p.is_alive():
                p.kill()
                p.join()


class TPModel:
    """Rank 0's model: the local shard's forward pass, with the step broadcast to the followers first; every
    other attribute is the shard model's (its config has the local head counts).

    Given the pool the ranks share (whole heads), it runs on rank 0's head slice of it. A layer hook (prefill
    streaming a layer's KV as soon as it is written) hears of layer i only once every rank has written it: after
    layer i's first all-reduce, which no rank reaches before its own write, i.e. when layer i+1 starts (and the
    last layer when the step ends)."""

    def __init__(self, model, group: TPGroup):
        self.model, self.group = model, group
        self._whole = self._slice = None  # the shared pool last stepped on, and rank 0's view of it

    def __getattr__(self, name):
        return getattr(self.model, name)

    def forward(self, batch, kv, layer_hook=None) -> torch.Tensor:
        if kv.layout.num_kv_heads != self.model.config.num_kv_heads:  # the shared pool: rank 0's head slice
            if self._whole is not kv:
                self._whole, self._slice = kv, kv.head_slice(0, self.group.size)
            kv = self._slice
        hook = None if layer_hook is None else _AfterReduce(layer_hook)
        try:
            self.group.step(encode_batch(batch))
            logits = self.model.forward(batch, kv, hook)
        except RuntimeError as e:  # a collective with a dead peer fails (gloo: connection reset)
            self.group.check_followers(e)
            raise
        if hook is not None:
            hook.finish()
        return logits

    def close(self) -> None:
        self.group.close()


class _AfterReduce:
    """A layer hook told of layer i when layer i+1 starts, and of the last layer by `finish` (see TPModel)."""

    def __init__(self, hook):
        self.hook, self.last = hook, None

    def __call__(self, i: int) -> None:
        if self.last is not None:
            self.hook(self.last)
        self.last = i

    def finish(self) -> None:
        if self.last is not None:
            self.hook(self.last)
            self.last = None


def start_tensor_parallel(path: str | Path, dtype: str, device: str, size: int, block_size: int,
                          num_blocks: int, shared: torch.Tensor | str | None = None) -> TPModel:
    """Start `size` ranks of the checkpoint at `path` (dtype a resolved name such as "float32"); rank 0's model.
    `shared`: the pool the ranks share (tp_load.rank_pool), None for a pool per rank."""
    group = TPGroup(device, size)
    group.spawn(str(path), dtype, block_size, num_blocks, shared)
    try:
        model = load_rank_model(path, dtype, rank_device(device, 0), 0, size)
        group.join()
    except BaseException:
        group.close()
        raise
    return TPModel(model, group)
