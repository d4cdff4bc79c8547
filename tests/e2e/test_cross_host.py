"""A mesh across hosts, emulated with network namespaces on one machine (netns.py): prefill on host A, decode on
host B, scheduler and cache on host C, the gateway in the root namespace. Greedy output equals HF's across hosts;
the negotiation picks a cross-host backend there and shared memory within one host; a partition (A's link taken
down mid-transfer) ends the request with a clear status and frees every KV block on the decode worker."""

import threading
import time

import grpc
import pytest

from netmesh import start_netns_mesh
from netns import NetnsHosts, skip_reason
from procs import health_status
from test_mesh_parity import hf_greedy
from kvmesh.transports import available_backends
from kvmesh.v1 import common_pb2, gateway_pb2, scheduler_pb2

needs_netns = pytest.mark.skipif(bool(skip_reason()), reason=skip_reason() or "netns available")

PROMPTS = [[5, 6, 7, 8, 9] * 7, [101, 7, 42, 3]]
MAX_TOKENS = 8
CROSS_HOST = "ucx" if "ucx" in available_backends() else "grpc"  # what `auto` must pick between hosts
CROSS_HOST_BACKENDS = [pytest.param(name, marks=[] if name in available_backends() else pytest.mark.skip(
    reason=f"{name} backend unavailable here (install kvmesh[ucx])")) for name in ("grpc", "ucx")]


@pytest.fixture(scope="module")
def hosts():
    """Three emulated hosts, a, b, c, torn down after the module (also when a test failed)."""
    with NetnsHosts(3) as built:
        yield built


def registered(mesh, role) -> list[tuple[str, str]]:
    """(advertised host, host id) of each worker of role the scheduler knows."""
    return [(w.address.rsplit(":", 1)[0], w.host_id) for w in mesh.workers(role)]


def generate_all(mesh, path) -> set[str]:
    """Greedy generations of PROMPTS, each asserted equal to HF's; the backends that moved their KV."""
    backends = set()
    for prompt in PROMPTS:
        got, responses = mesh.generate(prompt, MAX_TOKENS, ignore_eos=True)
        assert got == hf_greedy(path, prompt, MAX_TOKENS), prompt
        backends.add(responses[-1].timings.kv_transport)
    return backends


@needs_netns
@pytest.mark.parametrize("transport", ["auto", "grpc"])
def test_prefill_and_decode_on_two_hosts_give_hf_greedy_tokens_over_a_cross_host_backend(model_dir, hosts,
                                                                                       transport):
    a, b, c = hosts.hosts
    path = model_dir("llama")
    mesh = start_netns_mesh(str(path), control=c, prefills=[a], decodes=[b], transport=transport)
    try:
        assert registered(mesh, scheduler_pb2.WORKER_ROLE_PREFILL) == [(a.address, a.host_id)]
        assert registered(mesh, scheduler_pb2.WORKER_ROLE_DECODE) == [(b.address, b.host_id)]
        backends = generate_all(mesh, path)
        assert backends == {CROSS_HOST if transport == "auto" else transport}, backends  # never shm
        assert mesh.wait_blocks_free(10.0)
    finally:
        mesh.close()


@needs_netns
def test_prefill_and_decode_on_one_host_still_pick_shared_memory(model_dir, hosts):
    a, _b, c = hosts.hosts
    path = model_dir("llama")
    mesh = start_netns_mesh(str(path), control=c, prefills=[a], decodes=[a], transport="auto")
    try:
        assert generate_all(mesh, path) == {"shm"}
        assert mesh.wait_blocks_free(10.0)
    finally:
        mesh.close()


@needs_netns
def test_shared_memory_forced_between_two_hosts_is_refused_with_the_reason_and_frees_every_block(model_dir, hosts):
    a, b, c = hosts.hosts
    mesh = start_netns_mesh(str(model_dir("llama")), control=c, prefills=[a], decodes=[b], transport="shm")
    try:
        with pytest.raises(grpc.RpcError) as failure:
            mesh.generate(PROMPTS[1], MAX_TOKENS)
        # the scheduler pairs only workers with a backend usable between their hosts, and shm is not: refused
        # before any worker is asked, naming what each side offers and where
        assert failure.value.code() == grpc.StatusCode.UNAVAILABLE
        details = failure.value.details()
        assert "shares a transport backend usable between their hosts" in details, details
        assert f"prefill workers offer shm on host {a.host_id}" in details, details
        assert mesh.wait_blocks_free(10.0)
        assert all(health_status(p.address) == "SERVING" for p in [*mesh.prefills, *mesh.decodes])
    finally:
        mesh.close()


def decode_blocks_free(mesh) -> bool:
    stats = mesh.worker_stats(mesh.decodes[0], "decode")
    return stats.num_free_blocks == stats.num_total_blocks and not stats.num_handoffs and not stats.num_transfers


def wait_until(condition, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return condition()


@needs_netns
@pytest.mark.parametrize("transport", CROSS_HOST_BACKENDS)
def test_a_partition_mid_transfer_ends_the_request_with_a_clear_status_and_frees_the_decode_blocks(model_dir,
                                                                                                  hosts, transport):
    a, b, c = hosts.hosts
    mesh = start_netns_mesh(str(model_dir("llama")), control=c, prefills=[a], decodes=[b], transport=transport,
                            chaos="delay=1s", worker_args=("--handoff-lease-s", "2.5"))
    outcome = {}

    def generate():
        request = gateway_pb2.GenerateRequest(prompt_token_ids=PROMPTS[0],
                                              sampling=common_pb2.SamplingParams(temperature=0.0, max_tokens=8))
        try:
            outcome["tokens"] = [t for r in mesh.gateway_stub().Generate(request, timeout=120) for t in r.token_ids]
        except grpc.RpcError as exc:
            outcome["error"] = exc

    client = threading.Thread(target=generate, daemon=True)
    try:
        client.start()
        assert wait_until(lambda: mesh.worker_stats(mesh.decodes[0], "decode").num_transfers > 0, 60.0)
        hosts.set_link(a, up=False)
        client.join(100.0)
        assert not client.is_alive(), "the request hung after the partition"
        error = outcome.get("error")
        assert error is not None, f"a partitioned transfer produced tokens: {outcome}"
        assert error.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED), error
        assert "KV transfer from prefill worker" in error.details(), error.details()  # the mesh says why
        assert wait_until(lambda: decode_blocks_free(mesh), 15.0)
        hosts.set_link(a, up=True)
        assert mesh.wait_blocks_free(30.0)  # the prefill worker, reachable again, freed its side too
    finally:
        hosts.set_link(a, up=True)
        mesh.close()
