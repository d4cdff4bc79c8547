"""ReportFailure over real gRPC: a report about a dead worker opens its breaker at once (the scheduler's health
check confirms it), one about a live worker opens nothing, a stale or unknown one is ignored."""

import asyncio
import socket

import grpc
import pytest

from kvmesh.services.common.server import MeshServer
from kvmesh.services.scheduler import main as scheduler_main
from kvmesh.services.scheduler.config import SchedulerConfig
from kvmesh.v1 import common_pb2, scheduler_pb2, scheduler_pb2_grpc

PREFILL, DECODE = scheduler_pb2.WORKER_ROLE_PREFILL, scheduler_pb2.WORKER_ROLE_DECODE
LAYOUT = common_pb2.KVLayout(model_id="tiny", dtype="float32", block_size=16, num_layers=2, num_kv_heads=2,
                             head_dim=8)
OPEN, CLOSED = scheduler_pb2.BREAKER_STATE_OPEN, scheduler_pb2.BREAKER_STATE_CLOSED


def closed_port() -> int:
    """A port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_with_scheduler(body, **config):
    async def main():
        server = MeshServer(SchedulerConfig(port=0, **config), "scheduler")
        scheduler_main.setup(server.config, server)
        await server.start()
        try:
            async with grpc.aio.insecure_channel(server.address) as channel:
                await body(scheduler_pb2_grpc.SchedulerStub(channel), server.address)
        finally:
            await server.stop(0)

    asyncio.run(main())


async def register(stub, role, address):
    request = scheduler_pb2.RegisterRequest(role=role, address=address, layout=LAYOUT, transports=["grpc"])
    return (await stub.Register(request, timeout=2)).worker_id


async def breaker_of(stub, worker_id):
    workers = (await stub.ListWorkers(scheduler_pb2.ListWorkersRequest(), timeout=2)).workers
    return next(w for w in workers if w.worker_id == worker_id)


async def wait_for_state(stub, worker_id, state, timeout_s=5.0):
    """Poll ListWorkers until the worker's breaker is in state (the health check runs in the background)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while (await breaker_of(stub, worker_id)).breaker_state != state:
        assert loop.time() < deadline, f"breaker of {worker_id} never reached {state}"
        await asyncio.sleep(0.02)


async def wait_for_failures(stub, worker_id, num_failures, timeout_s=5.0):
    """Poll ListWorkers until the worker's breaker has counted num_failures consecutive failures."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while (await breaker_of(stub, worker_id)).num_breaker_failures != num_failures:
        assert loop.time() < deadline, f"breaker of {worker_id} never counted {num_failures} failures"
        await asyncio.sleep(0.02)


def test_one_report_about_a_dead_worker_takes_it_out_of_routing():
    async def body(stub, address):
        dead = await register(stub, DECODE, f"127.0.0.1:{closed_port()}")
        alive = await register(stub, DECODE, address)  # the scheduler's own port answers health checks
        await register(stub, PREFILL, address)
        reply = await stub.ReportFailure(scheduler_pb2.ReportFailureRequest(
            worker_id=dead, code=grpc.StatusCode.UNAVAILABLE.value[0], message="connection refused",
            reporter="test"), timeout=2)
        assert reply.counted
        await wait_for_state(stub, dead, OPEN)  # the failed health check is the second failure
        assert (await breaker_of(stub, dead)).num_breaker_opened == 1
        for _ in range(4):
            route = await stub.Route(scheduler_pb2.RouteRequest(prompt_token_ids=[1, 2]), timeout=2)
            assert route.decode.worker_id == alive

    run_with_scheduler(body, breaker_cooldown_s=30)


def test_one_report_about_a_live_worker_opens_nothing():
    async def body(stub, address):
        alive = await register(stub, DECODE, address)
        for report in (scheduler_pb2.ReportFailureRequest(address=address, role=DECODE),
                       scheduler_pb2.ReportFailureRequest(worker_id=alive)):
            reply = await stub.ReportFailure(report, timeout=2)
            assert reply.counted and reply.breaker_state == CLOSED
            await wait_for_failures(stub, alive, 0)  # the health check answered SERVING: the run ended
        info = await breaker_of(stub, alive)
        assert info.breaker_state == CLOSED and info.num_breaker_opened == 0

    run_with_scheduler(body)


def test_reports_about_unknown_workers_are_ignored_and_an_empty_one_is_invalid():
    async def body(stub, address):
        await register(stub, DECODE, address)
        reply = await stub.ReportFailure(scheduler_pb2.ReportFailureRequest(worker_id="decode-old"), timeout=2)
        assert not reply.counted and reply.breaker_state == scheduler_pb2.BREAKER_STATE_UNSPECIFIED
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.ReportFailure(scheduler_pb2.ReportFailureRequest(), timeout=2)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT

    run_with_scheduler(body)


def test_a_reregistered_worker_starts_with_a_closed_breaker_and_routed_counts_show():
    async def body(stub, address):
        dead_address = f"127.0.0.1:{closed_port()}"
        old = await register(stub, DECODE, dead_address)
        await stub.ReportFailure(scheduler_pb2.ReportFailureRequest(worker_id=old), timeout=2)
        await wait_for_state(stub, old, OPEN)
        new = await register(stub, DECODE, dead_address)  # restarted on the same address: a new incarnation
        await register(stub, PREFILL, address)
        assert (await breaker_of(stub, new)).breaker_state == CLOSED
        await stub.Route(scheduler_pb2.RouteRequest(prompt_token_ids=[1, 2]), timeout=2)
        assert (await breaker_of(stub, new)).num_routed_since_heartbeat == 1

    run_with_scheduler(body, breaker_cooldown_s=30)


def test_unreachable_tells_a_dead_peer_from_a_peer_that_answers_unavailable():
    from kvmesh.services.common.errors import unreachable

    async def body(stub, address):
        with pytest.raises(grpc.aio.AioRpcError) as answered:  # no workers: the scheduler itself says UNAVAILABLE
            await stub.Route(scheduler_pb2.RouteRequest(prompt_token_ids=[1]), timeout=2)
        assert answered.value.code() == grpc.StatusCode.UNAVAILABLE and not unreachable(answered.value)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{closed_port()}") as channel:
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await scheduler_pb2_grpc.SchedulerStub(channel).Route(scheduler_pb2.RouteRequest(), timeout=2)
        assert unreachable(refused.value)

    run_with_scheduler(body)
