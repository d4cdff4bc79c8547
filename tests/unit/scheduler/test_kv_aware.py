"""kv_aware routing: the pair with the least estimated TTFT, where cached prompt tokens cost far less than
computed ones; and the cache keys equal the engine's chained block hashes."""

from kvmesh.services import kv_identity
from kvmesh.services.kv_identity import KVLayout as Layout
from kvmesh.services.kv_identity import block_hashes, chain_salt, full_block_hashes, prompt_hashes
from kvmesh.services.scheduler.policies import POLICIES, RouteQuery, estimated_ttft, kv_aware
from kvmesh.services.scheduler.registry import Load, Registry, Role, WorkerSpec
from kvmesh.services.scheduler.router import route

FP32 = Layout("tiny", "float32", 16, 2, 2, 8)
BF16 = Layout("tiny", "bfloat16", 16, 2, 2, 8)
PROMPT = tuple(range(3, 1027))


def add(registry, role, port, layout, load=Load()):
    worker = registry.register(WorkerSpec(role, f"127.0.0.1:{port}", layout=layout))
    registry.heartbeat(worker.worker_id, load)
    return worker


def test_a_cached_prefix_outweighs_a_little_load():
    registry = Registry(lease_s=10)
    add(registry, Role.PREFILL, 1, FP32)
    add(registry, Role.DECODE, 2, FP32)
    busy_prefill = add(registry, Role.PREFILL, 3, BF16, Load(num_running=1))
    bf16_decode = add(registry, Role.DECODE, 4, BF16)
    query = RouteQuery("r", PROMPT, cached_tokens={BF16: 1008})
    plan = route(query, registry.workers(), kv_aware, max_queue=8)
    assert (plan.prefill.worker_id, plan.decode.worker_id) == (busy_prefill.worker_id, bf16_decode.worker_id)
    assert plan.num_cached_tokens == 1008 and plan.policy == "kv_aware" and POLICIES["kv_aware"] is kv_aware


def test_without_a_hit_the_idle_prefill_worker_wins():
    registry = Registry(lease_s=10)
    idle = add(registry, Role.PREFILL, 1, FP32)
    add(registry, Role.PREFILL, 2, FP32, Load(num_running=3))
    add(registry, Role.DECODE, 3, FP32)
    plan = route(RouteQuery("r", PROMPT), registry.workers(), kv_aware, max_queue=8)
    assert plan.prefill.worker_id == idle.worker_id and plan.num_cached_tokens == 0


def test_estimated_ttft_falls_with_the_hit_length():
    registry = Registry(lease_s=10)
    p, d = add(registry, Role.PREFILL, 1, FP32), add(registry, Role.DECODE, 2, FP32)
    cold, half, most = (estimated_ttft(RouteQuery("r", PROMPT, cached_tokens={FP32: n}), FP32, p, d)
                        for n in (0, 512, 912))
    assert cold > half > most and most < 0.25 * cold


def test_cache_keys_are_the_engines_chained_hashes_salted_by_layout_and_tenant():
    ids = list(range(100))
    salt = chain_salt("m", "float32", 16)
    assert block_hashes(ids, 16, salt) == kv_identity.extend_block_hashes([], ids, 16, salt)
    assert len(prompt_hashes(FP32, ids[:33])) == 2 and len(prompt_hashes(FP32, ids[:32])) == 1
    assert full_block_hashes(FP32, ids[:32]) != full_block_hashes(BF16, ids[:32])
    assert full_block_hashes(FP32, ids[:32], "tenant-a") != full_block_hashes(FP32, ids[:32], "tenant-b")
