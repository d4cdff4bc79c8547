"""The settings every engine worker (prefill, decode) shares; each worker's config subclasses `WorkerConfig`."""

from __future__ import annotations

import os
from dataclasses import dataclass

from kvmesh.services.common.config import TRANSPORTS, ServerConfig, check, knob
from kvmesh.transports import LOCAL_POOL, kv_pools, pool_backends

KV_POOLS = kv_pools()


@dataclass(frozen=True)
class WorkerConfig(ServerConfig):
    """Settings every engine worker (prefill, decode) shares."""

    model: str = knob("", "Folder of the model checkpoint (HF layout: config.json, safetensors, tokenizer).")
    dtype: str = knob("auto", "Weights and KV dtype: auto (on CUDA the checkpoint's own; on a CPU bfloat16 only "
                      "where it has native bf16 — avx512_bf16/amx_bf16 — and the checkpoint is 16-bit, else "
                      "float32), float32, bfloat16, float16.",
                      choices=("auto", "float32", "bfloat16", "float16"))
    device: str = knob("cpu", "torch device: cpu, cuda, cuda:1, ...")
    attention: str = knob("paged", "Attention over the KV pool: paged gathers a decode group a few MB of rows at a "
                                   "time (and a very long context in tiles of blocks); gather copies each group "
                                   "out whole first (the pure-torch fallback).", choices=("paged", "gather"))
    block_size: int = knob(16, "Tokens per KV block; prefill and decode workers may differ (a transfer "
                                 "re-chunks the tokens into the receiver's blocks).")
    kv_cache_bytes: int = knob(512 * 2**20, "Bytes of the KV block pool.")
    max_num_batched_tokens: int = knob(2048, "Token budget of one engine step (prefill chunks + decode tokens).")
    max_num_seqs: int = knob(64, "Most sequences in one engine step.")
    pack_prompt_tokens: int = knob(0, "A step starts another waiting prompt only while it holds fewer prompt tokens "
                                      "than this (0: while the token budget allows). On a CPU, where a step's time "
                                      "grows with every token, packing a second long prompt adds no throughput and "
                                      "delays the first one's first token by the second's whole cost: try 64.")
    tensor_parallel_size: int = knob(1, "Ranks the model is split over (attention heads and MLP columns; one "
                                        "process per rank, gloo on a CPU, NCCL on CUDA). On a CPU the ranks share "
                                        "one KV pool of whole-head blocks, so peers of any degree exchange KV.")
    torch_threads: int = knob(0, "torch intra-op threads; 0 keeps torch's default (one per core), or with cpus "
                                 "one per listed core.")
    cpus: str = knob("", "CPU cores this worker's process runs on, e.g. '0' or '0-1,3' (its affinity, so that "
                         "workers of one host do not contend for cores); empty: every core.")
    scheduler: str = knob("127.0.0.1:50050", "Address of the scheduler to register with, or several comma-separated "
                                            "(registered and heartbeating with each); empty: do not register.")
    advertise_host: str = knob("", "Host other workers should dial; empty: the bind host (or this host's name).")
    transport: str = knob("auto", "KV transport: auto negotiates (the best both ends offer, same-host ones only "
                                  f"on one host), or force one of {', '.join(TRANSPORTS[1:])}.", choices=TRANSPORTS)
    kv_pool: str = knob(KV_POOLS[0], "Where the KV pool lives: shm (a shared-memory segment, so a same-host peer writes "
                               "into it directly) or local (the process's own memory: device memory on CUDA, plain "
                               "torch memory on a CPU; the shm backend is then not offered, grpc and ucx are).",
                        choices=KV_POOLS)
    transport_chaos: str = knob("", "Degrade KV transfers for testing, e.g. 'delay=5ms,throttle=200MBps' "
                                    "(see kvmesh.transports.chaos).")
    handoff_lease_s: float = knob(30.0, "Seconds a KV handoff may sit without progress before its blocks are "
                                        "freed and the peer told.")
    cache: str = knob("", "Address of the KV cache service; empty: the scheduler's registered cache (if any). "
                          "'none': never use one.")
    cache_timeout_s: float = knob(2.0, "Deadline of each cache call; a slow or unreachable cache is a miss.")

    def validate(self) -> None:
        """Raise ConfigError when a worker setting is out of range."""
        super().validate()
        check(bool(self.model), "model is required: the folder of the checkpoint (--model PATH)")
        check(self.block_size > 0, f"block_size must be > 0, got {self.block_size}")
        check(self.kv_cache_bytes > 0, f"kv_cache_bytes must be > 0, got {self.kv_cache_bytes}")
        check(self.handoff_lease_s > 0, f"handoff_lease_s must be > 0, got {self.handoff_lease_s}")
        check(self.tensor_parallel_size >= 1, f"tensor_parallel_size must be >= 1, got {self.tensor_parallel_size}")
        check(self.pack_prompt_tokens >= 0, f"pack_prompt_tokens must be >= 0, got {self.pack_prompt_tokens}")
        check(self.torch_threads >= 0, f"torch_threads must be >= 0, got {self.torch_threads}")
        check(self.transport == "auto" or bool(pool_backends([self.transport], self.kv_pool)),
              f"--transport {self.transport} needs the KV pool in its own memory, not --kv-pool {self.kv_pool}; "
              f"drop --kv-pool {self.kv_pool} or force a backend that reaches process memory "
              f"({', '.join(pool_backends(TRANSPORTS[1:], LOCAL_POOL))})")
        self.cpu_set()  # raises ConfigError for a malformed list

    def cpu_set(self) -> set[int]:
        """The cores of `cpus` as a set (empty: no pinning); ConfigError for a malformed list or a core this
        machine does not have."""
        cores: set[int] = set()
        for part in filter(None, (p.strip() for p in self.cpus.split(","))):
            first, _, last = part.partition("-")
            check(first.isdigit() and (not last or last.isdigit()) and int(last or first) >= int(first),
                  f"cpus must be a list of cores and ranges such as '0-1,3', got {self.cpus!r}")
            cores.update(range(int(first), int(last or first) + 1))
        usable = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set(range(os.cpu_count() or 1))
        check(cores <= usable, f"cpus {self.cpus!r} names cores this process cannot use; it may use "
                               f"{','.join(map(str, sorted(usable)))}")
        return cores

    def backends(self) -> list[str]:
        """Transport backends this worker offers or uses, best first (with a local pool, none that needs the pool
        in shared memory)."""
        from kvmesh.transports import available_backends

        if self.transport != "auto":
            return [self.transport]
        return pool_backends(available_backends(), self.kv_pool)
