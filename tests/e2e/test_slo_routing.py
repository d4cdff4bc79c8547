"""The slo_aware scheduler in a real mesh: requests carry latency objectives (gRPC fields, HTTP headers); one no
route can meet is refused at once with RESOURCE_EXHAUSTED / 429 and a retry-after, and the mesh keeps serving;
the workers' heartbeats feed the scheduler's fitted cost models, which Scheduler.Stats shows."""

import time

import grpc
import httpx
import pytest

from mesh import start_mesh
from kvmesh.v1 import common_pb2, gateway_pb2, scheduler_pb2, scheduler_pb2_grpc

PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def mesh(model_dir):
    m = start_mesh(str(model_dir("llama")))
    yield m
    m.close()


def complete(mesh, headers=None):
    return httpx.post(f"{mesh.http_base}/completions", json={"prompt": PROMPT, "max_tokens": 4, "temperature": 0},
                      headers=headers or {}, timeout=60)


def test_an_http_request_whose_ttft_objective_no_route_meets_gets_429_with_retry_after(mesh):
    refused = complete(mesh, {"x-kvmesh-slo-ttft-ms": "0.001"})
    assert refused.status_code == 429, refused.text
    assert int(refused.headers["retry-after"]) >= 1 and "objectives" in refused.text
    assert complete(mesh, {"x-kvmesh-slo-ttft-ms": "60000", "x-kvmesh-slo-tpot-ms": "60000"}).status_code == 200
    assert complete(mesh).status_code == 200  # the scheduler's defaults: no objective


@pytest.mark.parametrize("value", ["soon", "-5", "0", "nan"])
def test_a_malformed_slo_header_is_a_400_naming_it(mesh, value):
    reply = complete(mesh, {"x-kvmesh-slo-tpot-ms": value})
    assert reply.status_code == 400 and "x-kvmesh-slo-tpot-ms" in reply.text


def test_a_grpc_request_whose_tpot_objective_no_route_meets_is_resource_exhausted(mesh):
    params = common_pb2.SamplingParams(temperature=0.0, max_tokens=4)
    request = gateway_pb2.GenerateRequest(prompt=PROMPT, sampling=params, slo_tpot_seconds=1e-7)
    with pytest.raises(grpc.RpcError) as refused:
        list(mesh.gateway_stub().Generate(request, timeout=60))
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "TPOT" in refused.value.details()
    assert int(dict(refused.value.trailing_metadata())["retry-after"]) >= 1
    tokens, _ = mesh.generate([1, 2, 3, 4, 5], max_tokens=4)
    assert len(tokens) == 4


def test_heartbeats_feed_the_fitted_cost_models_that_stats_show(mesh):
    stub = scheduler_pb2_grpc.SchedulerStub(mesh.channel(mesh.scheduler.address))
    deadline = time.monotonic() + 60
    for i in range(10_000):  # each request runs engine steps; each heartbeat (a second apart) carries their timings
        # a new prompt each time: a repeated one would be prefilled by the decode worker from its own pool
        mesh.generate([(i * 59 + j) % 500 + 3 for j in range(60)], max_tokens=8)
        stats = stub.Stats(scheduler_pb2.SchedulerStatsRequest(), timeout=5)
        if all(m.num_samples >= 8 for m in stats.models) or time.monotonic() > deadline:
            break
    assert stats.policy == "slo_aware" and len(stats.models) == 2
    assert all(m.num_samples >= 8 for m in stats.models), stats
    decode = next(m for m in stats.models if m.role == scheduler_pb2.WORKER_ROLE_DECODE)
    prefill = next(m for m in stats.models if m.role == scheduler_pb2.WORKER_ROLE_PREFILL)
    assert sum(decode.decode) > 0 and sum(prefill.prefill) > 0


def test_a_burst_over_the_queue_limit_is_refused_in_part_with_retry_after_and_the_rest_served(model_dir):
    """Admission counts what the scheduler routed since each heartbeat: a burst of 40 against --max-queue 4 is
    not admitted whole (a burst lands between two heartbeats, which alone would show no queue); and once the burst
    is over, the mesh is idle at once to the scheduler too (each finish is heartbeated before the client sees it),
    so a request right after it is admitted without following any Retry-After."""
    import concurrent.futures

    burst = start_mesh(str(model_dir("llama")), env={"KVMESH_SCHEDULER_MAX_QUEUE": "4"})
    try:
        with concurrent.futures.ThreadPoolExecutor(40) as pool:
            body = {"max_tokens": 8, "ignore_eos": True}
            replies = list(pool.map(lambda i: httpx.post(f"{burst.http_base}/completions", timeout=120,
                                                         json={**body, "prompt": [3 + i, 5, 7, 9] * 50}), range(40)))
        refused = [r for r in replies if r.status_code == 429]
        served = [r for r in replies if r.status_code == 200]
        assert refused and served and len(refused) + len(served) == 40, [r.status_code for r in replies]
        assert all(int(r.headers["retry-after"]) >= 1 for r in refused)
        assert all(r.json()["usage"]["completion_tokens"] == 8 for r in served)
        # the scheduler saw each request finish before its client did: the next request, sent at once, is served
        after = complete(burst)
        assert after.status_code == 200, after.text
        assert burst.wait_blocks_free(15)
    finally:
        burst.close()
