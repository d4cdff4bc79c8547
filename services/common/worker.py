"""What the prefill and decode workers share: their engine settings, engine start-up, KV region, registration
and the protobuf ↔ engine conversions of sampling params and logprobs."""

from __future__ import annotations

import os
from dataclasses import dataclass

from kvmesh.services.common import ids
from kvmesh.services.common.config import ServerConfig, check, knob
from kvmesh.services.common.registration import RegistrationClient, advertise_address
from kvmesh.v1 import common_pb2, scheduler_pb2

TRANSPORTS = ("auto", "shm", "ucx", "grpc")


@dataclass(frozen=True)
class WorkerConfig(ServerConfig):
    """Settings every engine worker (prefill, decode) shares."""

    model: str = knob("", "Folder of the model checkpoint (HF layout: config.json, safetensors, tokenizer).")
    dtype: str = knob("auto", "Weights and KV dtype: auto (the checkpoint's own), float32, bfloat16, float16.",
                      choices=("auto", "float32", "bfloat16", "float16"))
    device: str = knob("cpu", "torch device: cpu, cuda, cuda:1, ...")
    block_size: int = knob(16, "Tokens per KV block; every worker of a mesh must use the same.")
    kv_cache_bytes: int = knob(512 * 2**20, "Bytes of the KV block pool.")
    max_num_batched_tokens: int = knob(2048, "Token budget of one engine step (prefill chunks + decode tokens).")
    max_num_seqs: int = knob(64, "Most sequences in one engine step.")
    torch_threads: int = knob(0, "torch intra-op threads; 0 keeps torch's default (one per core).")
    scheduler: str = knob("127.0.0.1:50050", "Address of the scheduler to register with; empty: do not register.")
    advertise_host: str = knob("", "Host other workers should dial; empty: the bind host (or this host's name).")
    transport: str = knob("auto", "KV transport: auto negotiates (shm on one host, then ucx, then grpc), or "
                                  "force one of shm, ucx, grpc.", choices=TRANSPORTS)
    transport_chaos: str = knob("", "Degrade KV transfers for testing, e.g. 'delay=5ms,throttle=200MBps' "
                                    "(see kvmesh.transports.chaos).")
    handoff_lease_s: float = knob(30.0, "Seconds a KV handoff may sit without progress before its blocks are "
                                        "freed and the peer told.")
    cache: str = knob("", "Address of the KV cache service; empty: the scheduler's registered cache (if any). "
                          "'none': never use one.")
    cache_timeout_s: float = knob(2.0, "Deadline of each cache call; a slow or unreachable cache is a miss.")

    def validate(self) -> None:
        super().validate()
        check(bool(self.model), "model is required: the folder of the checkpoint (--model PATH)")
        check(self.block_size > 0, f"block_size must be > 0, got {self.block_size}")
        check(self.kv_cache_bytes > 0, f"kv_cache_bytes must be > 0, got {self.kv_cache_bytes}")
        check(self.handoff_lease_s > 0, f"handoff_lease_s must be > 0, got {self.handoff_lease_s}")
        check(self.torch_threads >= 0, f"torch_threads must be >= 0, got {self.torch_threads}")

    def backends(self) -> list[str]:
        """Transport backends this worker offers or uses, best first."""
        from kvmesh.transports import PREFERENCE, available_backends

        usable = available_backends()
        if self.transport != "auto":
            return [self.transport]
        return [b for b in PREFERENCE if b in usable]


def set_threads(config: WorkerConfig) -> None:
    """Apply the torch thread count (flag, else KVMESH_TORCH_THREADS)."""
    import torch

    threads = config.torch_threads or int(os.environ.get("KVMESH_TORCH_THREADS", "0") or 0)
    if threads:
        torch.set_num_threads(threads)


def load_engine(config: WorkerConfig, backends: list[str], prefix_caching: bool = False):
    """The engine, its KV pool placed in a region the transports can reach (shared memory when shm is offered);
    with prefix_caching its pool keeps finished requests' full blocks findable by hash."""
    from kvmesh.services.engine.engine import LLMEngine
    from kvmesh.transports import allocate_region

    regions = []

    def storage(num_layers: int, num_blocks: int, block_nbytes: int):
        regions.append(allocate_region(num_layers, num_blocks, block_nbytes, backends))
        return regions[-1].array

    engine = LLMEngine.from_path(config.model, dtype=config.dtype, device=config.device,
                                 block_size=config.block_size, kv_cache_bytes=config.kv_cache_bytes,
                                 max_num_batched_tokens=config.max_num_batched_tokens,
                                 max_num_seqs=config.max_num_seqs, kv_storage=storage,
                                 enable_prefix_caching=prefix_caching)
    return engine, regions[0]


def sampling_params(proto: common_pb2.SamplingParams):
    """Engine SamplingParams from the protobuf; unset fields take the documented defaults."""
    from kvmesh.services.engine.sampler import SamplingParams

    return SamplingParams(
        temperature=proto.temperature if proto.HasField("temperature") else 1.0,
        top_p=proto.top_p if proto.HasField("top_p") else 1.0,
        top_k=proto.top_k, min_p=proto.min_p,
        max_tokens=proto.max_tokens if proto.HasField("max_tokens") else 16,
        seed=proto.seed if proto.HasField("seed") else None,
        stop=tuple(proto.stop), stop_token_ids=tuple(proto.stop_token_ids), ignore_eos=proto.ignore_eos,
        logprobs=proto.logprobs if proto.HasField("logprobs") else None)


def logprob_protos(token_ids: list[int], entries) -> list[common_pb2.TokenLogprob]:
    """Engine logprob entries ({"logprob", "top": [(id, logprob), ...]}, or None) as TokenLogprob messages."""
    out = []
    for token_id, e in zip(token_ids, entries or ()):
        if e is None:
            continue
        top = e.get("top") or []
        out.append(common_pb2.TokenLogprob(token_id=token_id, logprob=e["logprob"],
                                           top_token_ids=[int(t) for t, _ in top],
                                           top_logprobs=[float(lp) for _, lp in top]))
    return out


def register(server, config: WorkerConfig, role: int, layout, descriptor, load,
             kv_events=None, local_prefill_max_tokens: int | None = None) -> RegistrationClient | None:
    """Register this worker with the scheduler and keep it registered while the server runs; kv_events(full)
    gives the KV events each heartbeat carries, local_prefill_max_tokens the tail it prefills itself (decode
    workers)."""
    if not config.scheduler:
        return None

    def request() -> scheduler_pb2.RegisterRequest:
        return scheduler_pb2.RegisterRequest(
            role=role, address=advertise_address(config.host, server.port, config.advertise_host),
            host_id=ids.host_id(), instance_id=server.instance_id, transports=config.backends(),
            layout=layout.to_proto(), descriptor=descriptor() if descriptor else None, model=layout.model_id,
            local_prefill_max_tokens=local_prefill_max_tokens)

    client = RegistrationClient(config.scheduler, request, load, channels=server.channels, kv_events=kv_events)
    client.attach(server)
    return client
