"""The Scheduler service over real gRPC on 127.0.0.1 (in process)."""

import asyncio

import grpc
import pytest

from kvmesh.services.common.server import MeshServer
from kvmesh.services.scheduler import main as scheduler_main
from kvmesh.services.scheduler.config import SchedulerConfig
from kvmesh.v1 import common_pb2, scheduler_pb2, scheduler_pb2_grpc

PREFILL, DECODE, CACHE = (scheduler_pb2.WORKER_ROLE_PREFILL, scheduler_pb2.WORKER_ROLE_DECODE,
                          scheduler_pb2.WORKER_ROLE_CACHE)


def layout(dtype="float32"):
    return common_pb2.KVLayout(model_id="tiny", dtype=dtype, block_size=16, num_layers=2, num_kv_heads=2,
                               head_dim=8)


def run_with_scheduler(body, **config):
    async def main():
        server = MeshServer(SchedulerConfig(port=0, **config), "scheduler")
        scheduler_main.setup(server.config, server)
        await server.start()
        try:
            async with grpc.aio.insecure_channel(server.address) as channel:
                await body(scheduler_pb2_grpc.SchedulerStub(channel))
        finally:
            await server.stop(0)

    asyncio.run(main())


TOKENS: dict[str, str] = {}  # worker id -> the lease token its Register returned


async def register(stub, role, port, dtype="float32", **load):
    descriptor = common_pb2.TransportDescriptor(backends=["grpc"], address=f"127.0.0.1:{port}",
                                                layout=layout(dtype))
    request = scheduler_pb2.RegisterRequest(role=role, address=f"127.0.0.1:{port}", host_id="h", instance_id="i",
                                            transports=["grpc"], layout=layout(dtype), descriptor=descriptor,
                                            load=scheduler_pb2.WorkerLoad(**load))
    reply = await stub.Register(request, timeout=2)
    TOKENS[reply.worker_id] = reply.lease_token
    return reply.worker_id


def beat(worker_id: str, **fields) -> scheduler_pb2.HeartbeatRequest:
    """A heartbeat for a worker `register` registered, with its lease token."""
    return scheduler_pb2.HeartbeatRequest(worker_id=worker_id, lease_token=TOKENS.get(worker_id, ""), **fields)


async def status_of(call) -> grpc.StatusCode:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    return caught.value.code()


def test_route_returns_the_least_loaded_pair_with_its_descriptor():
    async def body(stub):
        await register(stub, DECODE, 7001, num_running=3)
        idle = await register(stub, DECODE, 7002, num_running=0)
        prefill = await register(stub, PREFILL, 7003)
        await register(stub, PREFILL, 7004, dtype="bfloat16")
        reply = await stub.Route(scheduler_pb2.RouteRequest(request_id="r1", prompt_token_ids=[1, 2, 3]),
                                 timeout=2)
        assert (reply.decode.worker_id, reply.prefill.worker_id) == (idle, prefill)
        assert reply.decode.descriptor.address == "127.0.0.1:7002"
        assert reply.decode.layout == reply.prefill.layout == layout()
        assert reply.num_cached_tokens == 0 and reply.policy == "least_loaded"

    run_with_scheduler(body, policy="least_loaded")


def test_heartbeat_load_changes_the_route():
    async def body(stub):
        first = await register(stub, DECODE, 7001)
        second = await register(stub, DECODE, 7002, num_waiting=1)
        await register(stub, PREFILL, 7003)
        request = scheduler_pb2.RouteRequest(prompt_token_ids=[5])
        assert (await stub.Route(request, timeout=2)).decode.worker_id == first
        await stub.Heartbeat(beat(first, load=scheduler_pb2.WorkerLoad(num_running=4)), timeout=2)
        assert (await stub.Route(request, timeout=2)).decode.worker_id == second

    run_with_scheduler(body)


def test_a_dry_run_route_answers_without_counting_as_routed():
    async def body(stub):
        first = await register(stub, DECODE, 7001)
        second = await register(stub, DECODE, 7002)
        await register(stub, PREFILL, 7003)
        probe = scheduler_pb2.RouteRequest(prompt_token_ids=[5], dry_run=True)
        for _ in range(3):  # asked again and again, the answer stays: no phantom load builds up
            assert (await stub.Route(probe, timeout=2)).decode.worker_id == first
        real = scheduler_pb2.RouteRequest(prompt_token_ids=[5])
        assert (await stub.Route(real, timeout=2)).decode.worker_id == first
        assert (await stub.Route(probe, timeout=2)).decode.worker_id == second  # the real route counted
        workers = (await stub.ListWorkers(scheduler_pb2.ListWorkersRequest(), timeout=2)).workers
        assert {w.worker_id: w.num_routed_since_heartbeat for w in workers if w.role == DECODE} == \
            {first: 1, second: 0}

    run_with_scheduler(body)


def test_status_codes():
    async def body(stub):
        route = scheduler_pb2.RouteRequest(prompt_token_ids=[1])
        assert await status_of(stub.Route(route, timeout=2)) == grpc.StatusCode.UNAVAILABLE
        assert await status_of(stub.Route(scheduler_pb2.RouteRequest(), timeout=2)) == \
            grpc.StatusCode.INVALID_ARGUMENT
        assert await status_of(stub.Register(scheduler_pb2.RegisterRequest(address="127.0.0.1:1"), timeout=2)) == \
            grpc.StatusCode.INVALID_ARGUMENT
        assert await status_of(stub.Register(scheduler_pb2.RegisterRequest(role=DECODE, address="127.0.0.1:1"),
                                             timeout=2)) == grpc.StatusCode.INVALID_ARGUMENT
        assert await status_of(stub.Heartbeat(scheduler_pb2.HeartbeatRequest(worker_id="decode-x"), timeout=2)) == \
            grpc.StatusCode.NOT_FOUND
        await register(stub, DECODE, 7001, num_waiting=2)
        await register(stub, PREFILL, 7002)
        assert await status_of(stub.Route(route, timeout=2)) == grpc.StatusCode.RESOURCE_EXHAUSTED
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.Route(route, timeout=2)
        assert int(dict(refused.value.trailing_metadata())["retry-after"]) >= 1  # when to come back

    run_with_scheduler(body, max_queue=2)


def test_lease_expiry_drops_a_silent_worker_and_list_workers_filters_by_role():
    async def body(stub):
        silent = await register(stub, DECODE, 7001)
        reply = await stub.Register(scheduler_pb2.RegisterRequest(role=CACHE, address="127.0.0.1:7009"), timeout=2)
        cache, TOKENS[reply.worker_id] = reply.worker_id, reply.lease_token
        listed = await stub.ListWorkers(scheduler_pb2.ListWorkersRequest(role=CACHE), timeout=2)
        assert [w.worker_id for w in listed.workers] == [cache]
        # keep the cache alive (a beat every 0.15 s against a 2 s lease: on a loaded machine a beat can take a
        # while), until the silent decode worker's lease lapses
        deadline = asyncio.get_running_loop().time() + 30
        while True:
            await asyncio.sleep(0.15)
            await stub.Heartbeat(beat(cache), timeout=2)
            listed = await stub.ListWorkers(scheduler_pb2.ListWorkersRequest(), timeout=2)
            if len(listed.workers) < 2 or asyncio.get_running_loop().time() > deadline:
                break
        assert [w.worker_id for w in listed.workers] == [cache]
        assert await status_of(stub.Heartbeat(beat(silent), timeout=2)) == \
            grpc.StatusCode.NOT_FOUND
        leave = scheduler_pb2.DeregisterRequest(worker_id=cache, lease_token=TOKENS[cache])
        assert (await stub.Deregister(leave, timeout=2)).removed
        assert not (await stub.Deregister(leave, timeout=2)).removed

    run_with_scheduler(body, lease_s=2.0)


def test_route_refuses_a_request_whose_slo_no_route_meets_and_stats_show_the_fitted_models():
    async def body(stub):
        decode = await register(stub, DECODE, 7001)
        await register(stub, PREFILL, 7002)
        contexts = [500 * (b * 7 % 11) + 50 for b in range(1, 33)]  # not in proportion to the batch
        steps = [scheduler_pb2.StepSample(num_decode_seqs=b, num_context_tokens=c, seconds=0.01 + 0.002 * b + 1e-6 * c)
                 for b, c in zip(range(1, 33), contexts)]
        await stub.Heartbeat(beat(decode, load=scheduler_pb2.WorkerLoad(num_running=30, steps=steps)), timeout=2)
        stats = await stub.Stats(scheduler_pb2.SchedulerStatsRequest(), timeout=2)
        model = next(m for m in stats.models if m.worker_id == decode)
        assert model.num_samples == 32 and model.decode[1] == pytest.approx(0.002, rel=0.05)
        assert stats.policy == "slo_aware"
        prompt = list(range(1, 100))
        ok = await stub.Route(scheduler_pb2.RouteRequest(prompt_token_ids=prompt, slo_tpot_seconds=0.1), timeout=2)
        assert ok.kv_source == "recompute" and 0 < ok.predicted_tpot_seconds < 0.1 and ok.predicted_ttft_seconds > 0
        strict = scheduler_pb2.RouteRequest(prompt_token_ids=prompt, slo_tpot_seconds=0.05)  # 30 running: 72 ms
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.Route(strict, timeout=2)
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "TPOT" in refused.value.details()
        assert int(dict(refused.value.trailing_metadata())["retry-after"]) >= 1
        await stub.Route(scheduler_pb2.RouteRequest(prompt_token_ids=prompt), timeout=2)  # still serving

    run_with_scheduler(body)


def test_only_the_registering_process_can_renew_or_end_a_lease():
    """Worker ids are public (ListWorkers, Route); the lease token Register returned is not, and it alone renews or
    ends the lease: a Deregister loop by anyone else must not take a healthy worker out of routing."""
    async def body(stub):
        decode = await register(stub, DECODE, 7001)
        listed = (await stub.ListWorkers(scheduler_pb2.ListWorkersRequest(), timeout=2)).workers
        assert decode in [w.worker_id for w in listed] and TOKENS[decode] not in str(listed)
        for token in ("", "guess", TOKENS[decode][:-1]):
            leave = scheduler_pb2.DeregisterRequest(worker_id=decode, lease_token=token)
            assert await status_of(stub.Deregister(leave, timeout=2)) == grpc.StatusCode.PERMISSION_DENIED
            forged = scheduler_pb2.HeartbeatRequest(worker_id=decode, lease_token=token,
                                                    load=scheduler_pb2.WorkerLoad(num_waiting=999))
            assert await status_of(stub.Heartbeat(forged, timeout=2)) == grpc.StatusCode.PERMISSION_DENIED
        listed = (await stub.ListWorkers(scheduler_pb2.ListWorkersRequest(), timeout=2)).workers
        assert [(w.worker_id, w.load.num_waiting) for w in listed] == [(decode, 0)]
        await stub.Heartbeat(beat(decode), timeout=2)
        leave = scheduler_pb2.DeregisterRequest(worker_id=decode, lease_token=TOKENS[decode])
        assert (await stub.Deregister(leave, timeout=2)).removed

    run_with_scheduler(body)
