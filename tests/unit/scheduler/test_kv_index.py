"""The scheduler's index of what each decode worker's prefix cache holds, fed by KV events on heartbeats, and
routing on it: kv_aware prefers the decode worker holding the prompt's prefix; least_loaded ignores it."""

import asyncio

from kvmesh.services.kv_identity import prompt_hashes
from kvmesh.services.common.registration import RegistrationClient
from kvmesh.services.common.server import MeshServer
from kvmesh.services.scheduler import main as scheduler_main
from kvmesh.services.scheduler.config import SchedulerConfig
from kvmesh.services.scheduler.kv_index import KVIndex
from kvmesh.services.scheduler.policies import RouteQuery, kv_aware, least_loaded
from kvmesh.services.kv_identity import KVLayout as Layout
from kvmesh.services.scheduler.registry import Load, Registry, Role, WorkerSpec
from kvmesh.services.scheduler.router import route
from kvmesh.v1 import common_pb2, scheduler_pb2

LAYOUT = Layout("tiny", "float32", 16, 2, 2, 8)
PROMPT = tuple(range(3, 3 + 16 * 20 + 5))
HASHES = prompt_hashes(LAYOUT, PROMPT)


def add(registry, role, port, load=Load()):
    worker = registry.register(WorkerSpec(role, f"127.0.0.1:{port}", layout=LAYOUT))
    registry.heartbeat(worker.worker_id, load)
    return worker


def test_events_store_remove_and_resync():
    index = KVIndex()
    assert not index.apply("d", HASHES[:2], (), full=False)  # deltas before any resync: ask for one
    assert index.apply("d", HASHES[:4], (), full=True)
    assert index.hit_blocks("d", HASHES) == 4
    assert index.apply("d", HASHES[4:6], HASHES[1:2], full=False)
    assert index.hit_blocks("d", HASHES) == 1  # the chain breaks at the removed block
    assert index.apply("d", HASHES[:3], (), full=True)  # a resync replaces, it does not add
    assert index.num_hashes("d") == 3 and index.hit_blocks("d", HASHES) == 3


def test_an_entry_goes_with_its_worker_lease_deregistration_or_replacement():
    now = [0.0]
    registry = Registry(lease_s=1, clock=lambda: now[0])
    a, b = add(registry, Role.DECODE, 1), add(registry, Role.DECODE, 2)
    for w in (a, b):
        assert registry.apply_kv_events(w.worker_id, HASHES, (), True)
    assert len(registry.kv_index) == 2
    registry.deregister(a.worker_id)
    assert registry.kv_index.num_hashes(a.worker_id) == 0
    now[0] = 5.0
    assert [w.worker_id for w in registry.expire()] == [b.worker_id]
    assert len(registry.kv_index) == 0
    c = add(registry, Role.DECODE, 3)
    registry.apply_kv_events(c.worker_id, HASHES, (), True)
    add(registry, Role.DECODE, 3)  # the same address registers again: the old entry goes
    assert registry.kv_index.num_hashes(c.worker_id) == 0


def test_kv_aware_prefers_the_decode_worker_holding_the_prefix_and_least_loaded_does_not():
    registry = Registry(lease_s=10)
    add(registry, Role.PREFILL, 1)
    idle = add(registry, Role.DECODE, 2)
    holder = add(registry, Role.DECODE, 3, Load(num_running=1, num_free_blocks=90, num_total_blocks=100))
    registry.apply_kv_events(holder.worker_id, HASHES, (), True)
    held = registry.kv_index.hit_tokens(registry.workers(Role.DECODE), PROMPT, "")
    assert held == {holder.worker_id: 20 * 16}
    query = RouteQuery("r", PROMPT, decode_cached_tokens=held)
    plan = route(query, registry.workers(), kv_aware, max_queue=8)
    assert plan.decode.worker_id == holder.worker_id and plan.num_decode_cached_tokens == 320
    plan = route(query, registry.workers(), least_loaded, max_queue=8)
    assert plan.decode.worker_id == idle.worker_id and plan.num_decode_cached_tokens == 0
    other_salt = registry.kv_index.hit_tokens(registry.workers(Role.DECODE), PROMPT, "tenant")
    assert other_salt == {holder.worker_id: 0}  # salts isolate in the index too


def test_a_held_prefix_spares_the_handoff_not_the_compute_unless_the_holder_prefills_the_tail_itself():
    registry = Registry(lease_s=10)
    add(registry, Role.PREFILL, 1)
    idle = add(registry, Role.DECODE, 2)
    holder = add(registry, Role.DECODE, 3, Load(num_waiting=1, num_free_blocks=90, num_total_blocks=100))
    registry.apply_kv_events(holder.worker_id, HASHES, (), True)
    longer = PROMPT + tuple(range(2000, 2040))  # 45 tokens past the held blocks: the prefill worker computes all
    held = registry.kv_index.hit_tokens(registry.workers(Role.DECODE), longer, "")
    assert held[holder.worker_id] == 320
    plan = route(RouteQuery("r", longer, decode_cached_tokens=held), registry.workers(), kv_aware, max_queue=8)
    assert plan.decode.worker_id == idle.worker_id  # the holder's queue costs more than the handoff it saves
    held = registry.kv_index.hit_tokens(registry.workers(Role.DECODE), PROMPT, "")
    plan = route(RouteQuery("r", PROMPT, decode_cached_tokens=held), registry.workers(), kv_aware, max_queue=8)
    assert plan.decode.worker_id == holder.worker_id  # a 5-token tail: the holder prefills it, no prefill at all


def test_heartbeats_carry_deltas_resync_after_registration_and_route_reports_the_hit():
    proto_layout = common_pb2.KVLayout(model_id="tiny", dtype="float32", block_size=16, num_layers=2,
                                       num_kv_heads=2, head_dim=8)
    sent: list[tuple[bool, int]] = []
    pending = {"stored": list(HASHES[:3])}
    held: list[bytes] = []

    async def kv_events(full: bool) -> scheduler_pb2.KVEvents:  # a worker's pool: everything, or what is new
        held.extend(pending["stored"])
        stored = list(held) if full else pending["stored"]
        pending["stored"] = []
        sent.append((full, len(stored)))
        return scheduler_pb2.KVEvents(stored=stored, full=full)

    async def body():
        # the prefill worker below is registered by hand and never heartbeats: its lease must outlast the test on a
        # loaded machine (with 3 s it lapsed mid-test under load, and Route found no pair)
        scheduler = MeshServer(SchedulerConfig(port=0, lease_s=600, policy="kv_aware", cache_probe=False),
                               "scheduler")
        servicer = scheduler_main.setup(scheduler.config, scheduler)
        await scheduler.start()
        prefill = scheduler_pb2.RegisterRequest(role=scheduler_pb2.WORKER_ROLE_PREFILL, address="127.0.0.1:8",
                                                layout=proto_layout)
        servicer.registry.register(scheduler_main_spec(prefill))
        client = RegistrationClient(scheduler.address, lambda: scheduler_pb2.RegisterRequest(
            role=scheduler_pb2.WORKER_ROLE_DECODE, address="127.0.0.1:9", layout=proto_layout),
            lambda: scheduler_pb2.WorkerLoad(), kv_events=kv_events, interval_s=0.05)
        task = asyncio.create_task(client.run())
        try:
            await asyncio.wait_for(client.registered.wait(), 5)
            await until(lambda: len(sent) >= 3, sent)
            assert sent[0][0] and not sent[1][0]  # a resync first, then deltas
            registry = servicer.registry
            assert registry.kv_index.num_hashes(client.worker_id) == 3
            pending["stored"] = list(HASHES[3:5])
            await until(lambda: registry.kv_index.num_hashes(client.worker_id) == 5, sent)
            reply = await servicer.Route(scheduler_pb2.RouteRequest(request_id="r", prompt_token_ids=PROMPT), None)
            assert reply.num_decode_cached_tokens == 5 * 16
            old = client.worker_id
            registry.deregister(old)  # the scheduler forgets it: the worker registers again and resyncs
            await until(lambda: client.worker_id != old and registry.kv_index.num_hashes(client.worker_id), sent)
            assert sent[-1][0]
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await scheduler.stop(0)

    asyncio.run(body())


async def until(predicate, what, timeout_s=5.0):
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, f"condition not reached: {what}"
        await asyncio.sleep(0.02)


def scheduler_main_spec(request):
    from kvmesh.services.scheduler.servicer import spec_from_proto

    return spec_from_proto(request)


def test_the_scheduler_asks_for_a_resync_when_it_cannot_place_deltas():
    async def body():
        scheduler = MeshServer(SchedulerConfig(port=0, lease_s=600, cache_probe=False), "scheduler")
        servicer = scheduler_main.setup(scheduler.config, scheduler)
        proto_layout = common_pb2.KVLayout(model_id="tiny", dtype="float32", block_size=16, num_layers=2,
                                           num_kv_heads=2, head_dim=8)
        worker = servicer.registry.register(scheduler_main_spec(scheduler_pb2.RegisterRequest(
            role=scheduler_pb2.WORKER_ROLE_DECODE, address="127.0.0.1:9", layout=proto_layout)))

        async def beat(**events):
            return await servicer.Heartbeat(scheduler_pb2.HeartbeatRequest(
                worker_id=worker.worker_id, lease_token=worker.lease_token, kv_events=scheduler_pb2.KVEvents(**events)), None)

        assert (await beat(stored=HASHES[:2])).resync_kv_events  # deltas with nothing to apply them to
        assert not (await beat(stored=HASHES[:2], full=True)).resync_kv_events
        assert not (await beat(stored=HASHES[2:3], removed=HASHES[:1])).resync_kv_events
        assert servicer.registry.kv_index.num_hashes(worker.worker_id) == 2
        plain = await servicer.Heartbeat(scheduler_pb2.HeartbeatRequest(worker_id=worker.worker_id,
                                                                            lease_token=worker.lease_token), None)
        assert not plain.resync_kv_events  # a worker without a prefix cache sends no events

    asyncio.run(body())
