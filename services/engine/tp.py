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
from pathlib import Path

import torch

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

    def start(self, path: str, dtype: str, block_size: int, num_blocks: int) -> None:
        """Spawn ranks 1..N-1 (they load their own shards) and join the group as rank 0."""
        import torch.multiprocessing as mp

        ctx = mp.get_context("spawn")
        threads = int(os.environ.get("KVMESH_TORCH_THREADS") or max(1, (os.cpu_count() or 1) // self.size))
        for rank in range(1, self.size):
            p = ctx.Process(target=follower_main, name=f"kvmesh-tp-rank{rank}", daemon=True,
                            args=(str(path), dtype, self.device, block_size, num_blocks, rank, self.size, self.port,
                                  os.getpid(), threads))
            p.start()
            self.followers.append(p)
        atexit.register(self.close)
        init_group(self.device, 0, self.size, self.port)

    def step(self, payload: torch.Tensor) -> None:
        broadcast_step(OP_STEP, payload, self.comm_device)

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
        for p in self.followers:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
                p.join()


class TPModel:
    """Rank 0's model: the local shard's forward pass, with the step broadcast to the followers first; every
    other attribute is the shard model's (its config has the local head counts, as the KV pool does)."""

    def __init__(self, model, group: TPGroup):
        self.model, self.group = model, group

    def __getattr__(self, name):
        return getattr(self.model, name)

    def forward(self, batch, kv, layer_hook=None) -> torch.Tensor:
        self.group.step(encode_batch(batch))
        return self.model.forward(batch, kv, layer_hook)

    def close(self) -> None:
        self.group.close()


def start_tensor_parallel(path: str | Path, dtype: str, device: str, size: int, block_size: int,
                          num_blocks: int) -> TPModel:
    """Start `size` ranks of the checkpoint at `path` (dtype a resolved name such as "float32"); rank 0's model."""
    group = TPGroup(device, size)
    group.start(str(path), dtype, block_size, num_blocks)
    try:
        return TPModel(load_rank_model(path, dtype, rank_device(device, 0), 0, size), group)
    except Exception:
        group.close()
        raise
