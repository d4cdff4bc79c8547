"""The scheduler's KV link models in a real mesh: the prefill worker reports the handoffs it sends and the cache
the fetches it delivers on their heartbeats, and after a few requests Scheduler.Stats shows a fitted link for the
(prefill, decode, backend) pair used and a fetch link into the prefill worker, with plausible figures."""

import math
import time

import pytest

from mesh import start_mesh
from kvmesh.v1 import scheduler_pb2, scheduler_pb2_grpc

MIN_SAMPLES = 4  # links.MIN_SAMPLES: a link is fitted from this many


@pytest.fixture(scope="module")
def mesh(model_dir):
    # kv_aware always fetches a cached prefix (slo_aware may recompute one a tiny model computes faster); without
    # the decode worker's own prefix cache, a repeated prompt comes from the cache service
    m = start_mesh(str(model_dir("llama")), decode_prefix_caching=False, policy="kv_aware")
    yield m
    m.close()


def prompt(seed: int, num_blocks: int) -> list[int]:
    return [(i * seed + 11) % 1000 + 3 for i in range(num_blocks * 16 + 3)]


def plausible(link: scheduler_pb2.LinkModel) -> bool:
    return (link.num_samples > 0 and 0 < link.gbps and math.isfinite(link.gbps) and link.fixed_seconds >= 0
            and math.isfinite(link.fixed_seconds))


def test_stats_show_the_fitted_handoff_and_fetch_links_of_the_pair_used(mesh):
    stub = scheduler_pb2_grpc.SchedulerStub(mesh.channel(mesh.scheduler.address))
    workers = stub.ListWorkers(scheduler_pb2.ListWorkersRequest(), timeout=5).workers
    prefill = next(w for w in workers if w.role == scheduler_pb2.WORKER_ROLE_PREFILL)
    decode = next(w for w in workers if w.role == scheduler_pb2.WORKER_ROLE_DECODE)
    receiver = decode.descriptor.address or decode.address
    deadline = time.monotonic() + 90
    for i in range(10_000):  # prompts of 1..6 blocks, each asked twice: the second time the cache delivers it
        tokens, _ = mesh.generate(prompt(31 + i // 2, 1 + i // 2 % 6), max_tokens=2)
        assert len(tokens) == 2
        links = stub.Stats(scheduler_pb2.SchedulerStatsRequest(), timeout=5).links
        pair = [k for k in links if k.kind == "transfer" and k.sender_id == prefill.worker_id]
        fetch = [k for k in links if k.kind == "fetch" and k.receiver]
        if (pair and pair[0].num_samples >= MIN_SAMPLES and fetch) or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert [(k.receiver, k.backend in decode.transports) for k in pair] == [(receiver, True)], links
    handoff = pair[0]
    assert handoff.fitted and plausible(handoff) and handoff.num_samples >= MIN_SAMPLES
    across = next(k for k in links if k.kind == "transfer" and not k.sender_id and k.backend == handoff.backend)
    assert plausible(across) and across.num_samples >= handoff.num_samples
    assert fetch and all(plausible(k) and k.ssd_gbps > 0 for k in fetch), links
    # the route's answer carries on: a prediction over the fitted link is a number
    route = stub.Route(scheduler_pb2.RouteRequest(prompt_token_ids=prompt(7, 3), dry_run=True), timeout=5)
    assert route.decode.worker_id == decode.worker_id
