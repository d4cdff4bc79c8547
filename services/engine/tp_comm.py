"""The collectives of tensor parallelism: joining the group, the step broadcast, the all-reduce, and the
follower's watch on its driver. torch.distributed over gloo on the CPU, NCCL on CUDA (rank r on cuda:r); the
rendezvous is a TCP store on 127.0.0.1 at a free port that rank 0 hosts."""

from __future__ import annotations

import datetime
import os
import threading
import time

import torch

from kvmesh.services.ports import free_port  # noqa: F401 - the rendezvous port: below the ephemeral range

OP_STEP, OP_STOP = 1, 0
TIMEOUT = datetime.timedelta(seconds=600)  # a collective waits this long for a slow peer on a loaded machine


def backend_for(device: str) -> str:
    """gloo on the CPU, nccl on CUDA."""
    return "nccl" if str(device).startswith("cuda") else "gloo"


def rank_device(device: str, rank: int) -> str:
    """Where rank `rank` runs: its own GPU on CUDA, the CPU otherwise."""
    return f"cuda:{rank}" if str(device).startswith("cuda") else str(device)


def init_group(device: str, rank: int, size: int, port: int) -> None:
    """Join the process group of `size` ranks whose store listens on 127.0.0.1:port (rank 0 hosts it)."""
    import torch.distributed as dist

    if str(device).startswith("cuda"):
        torch.cuda.set_device(rank_device(device, rank))
    dist.init_process_group(backend_for(device), init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=size, timeout=TIMEOUT)


def all_reduce(x: torch.Tensor) -> torch.Tensor:
    """Sum `x` over the ranks, in place; returns it."""
    import torch.distributed as dist

    dist.all_reduce(x)
    return x


def broadcast_step(op: int, payload: torch.Tensor | None, device: str) -> None:
    """Rank 0's side of `receive_step`: the [op, length] header, then the payload (if any)."""
    import torch.distributed as dist

    header = torch.tensor([op, 0 if payload is None else payload.numel()], dtype=torch.long, device=device)
    dist.broadcast(header, 0)
    if payload is not None:
        dist.broadcast(payload.to(device), 0)


def receive_step(device: str) -> torch.Tensor | None:
    """The next step's payload from the driver; None when the driver says stop."""
    import torch.distributed as dist

    header = torch.zeros(2, dtype=torch.long, device=device)
    dist.broadcast(header, 0)
    op, length = header.tolist()
    if op == OP_STOP:
        return None
    payload = torch.empty(length, dtype=torch.long, device=device)
    dist.broadcast(payload, 0)
    return payload


def watch_parent(parent_pid: int) -> None:
    """Exit this process as soon as the driver is gone (re-parented: our parent pid changes)."""
    def watch():
        while os.getppid() == parent_pid:
            time.sleep(0.2)
        os._exit(0)

    threading.Thread(target=watch, name="tp-parent-watch", daemon=True).start()
