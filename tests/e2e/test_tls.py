"""mTLS between services, on a mesh of real processes: no certificate, no call; a certificate of the wrong role,
PERMISSION_DENIED; the right ones serve requests."""

import time

import grpc
import pytest

from mesh import make_certs, start_mesh
from procs import health_status
from kvmesh.services.common import certs, tls
from kvmesh.v1 import (cache_pb2, cache_pb2_grpc, common_pb2, decode_pb2, decode_pb2_grpc, kv_pb2, kv_pb2_grpc,
                       prefill_pb2, prefill_pb2_grpc, scheduler_pb2, scheduler_pb2_grpc)


@pytest.fixture(scope="module")
def tls_mesh(model_dir, tmp_path_factory):
    folder = make_certs(tmp_path_factory.mktemp("certs"))
    mesh = start_mesh(str(model_dir("llama")), transport="grpc", tls_dir=folder)
    yield mesh
    mesh.close()


def code_of(call) -> str:
    """The status code name a call ends with ("OK" when it succeeds); a streaming call is read to its end."""
    try:
        result = call()
        if hasattr(result, "__iter__") and not hasattr(result, "ListFields"):
            list(result)
    except grpc.RpcError as exc:
        return exc.code().name
    return "OK"


def calls_of_every_internal_rpc(mesh, channel_to) -> dict:
    """One call per internal RPC the issue names, each over `channel_to(address)`."""
    scheduler = scheduler_pb2_grpc.SchedulerStub(channel_to(mesh.scheduler.address))
    prefill = prefill_pb2_grpc.PrefillStub(channel_to(mesh.prefills[0].address))
    decode = decode_pb2_grpc.DecodeStub(channel_to(mesh.decodes[0].address))
    kv = kv_pb2_grpc.KVTransferStub(channel_to(mesh.decodes[0].address))
    cache = cache_pb2_grpc.CacheStub(channel_to(mesh.cache.address))
    sampling = common_pb2.SamplingParams(temperature=0.0, max_tokens=2)
    return {
        "Register": lambda: scheduler.Register(scheduler_pb2.RegisterRequest(
            role=scheduler_pb2.WORKER_ROLE_DECODE, address="127.0.0.1:1"), timeout=5),
        "Route": lambda: scheduler.Route(scheduler_pb2.RouteRequest(prompt_token_ids=[1, 2, 3]), timeout=5),
        "Prefill": lambda: prefill.Prefill(prefill_pb2.PrefillRequest(request_id="x"), timeout=5),
        "Decode": lambda: decode.Generate(decode_pb2.DecodeRequest(request_id="x", prompt_token_ids=[1, 2],
                                                                   sampling=sampling), timeout=5),
        "KVTransfer": lambda: kv.Open(kv_pb2.OpenRequest(transfer_id="x"), timeout=5),
        "Put": lambda: cache.Put(cache_pb2.PutRequest(block_hash=b"\0" * 16, data=b"forged"), timeout=5),
        "Clear": lambda: cache.Clear(cache_pb2.ClearRequest(), timeout=5),
        "Fetch": lambda: cache.Fetch(cache_pb2.FetchRequest(block_hashes=[b"\0" * 16]), timeout=5),
    }


def test_a_client_without_a_certificate_reaches_no_internal_rpc(tls_mesh):
    channels = []

    def plaintext(address):
        channels.append(grpc.insecure_channel(address))
        return channels[-1]

    try:
        codes = {name: code_of(call) for name, call in calls_of_every_internal_rpc(tls_mesh, plaintext).items()}
    finally:
        for channel in channels:
            channel.close()
    assert codes == dict.fromkeys(codes, "UNAVAILABLE")  # the TLS handshake fails before any RPC


def test_a_certificate_from_another_ca_reaches_no_internal_rpc(tls_mesh, tmp_path):
    stranger = tls.load(certs.init_dir(tmp_path / "other"), "decode")  # a right role, but not our CA
    with tls.open_channel(tls_mesh.scheduler.address, aio=False, identity=stranger) as channel:
        stub = scheduler_pb2_grpc.SchedulerStub(channel)
        assert code_of(lambda: stub.ListWorkers(scheduler_pb2.ListWorkersRequest(), timeout=5)) == "UNAVAILABLE"


def test_the_admin_certificate_gets_past_the_handshake(tls_mesh):
    # the same calls that fail without a certificate are answered with one: the refusals above are TLS's doing
    codes = {name: code_of(call) for name, call in calls_of_every_internal_rpc(tls_mesh, tls_mesh.channel).items()}
    assert codes["Clear"] == "OK"  # admin may clear the cache
    assert "UNAVAILABLE" not in codes.values()
    assert codes["Register"] == codes["Put"] == codes["Route"] == "PERMISSION_DENIED"  # but not act as a worker


def _as(mesh, role: str, address: str) -> grpc.Channel:
    return tls.open_channel(address, aio=False, identity=tls.load(mesh.tls_dir, role))


def test_a_prefill_certificate_cannot_register_as_decode(tls_mesh):
    with _as(tls_mesh, "prefill", tls_mesh.scheduler.address) as channel:
        stub = scheduler_pb2_grpc.SchedulerStub(channel)
        with pytest.raises(grpc.RpcError) as caught:
            stub.Register(scheduler_pb2.RegisterRequest(role=scheduler_pb2.WORKER_ROLE_DECODE,
                                                        address="127.0.0.1:1"), timeout=5)
        assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "prefill certificate may not Register as WORKER_ROLE_DECODE" in caught.value.details()
        # as its own role it passes the role check, and meets the scheduler's own validation
        as_prefill = code_of(lambda: stub.Register(scheduler_pb2.RegisterRequest(
            role=scheduler_pb2.WORKER_ROLE_PREFILL, address=""), timeout=5))
        assert as_prefill == "INVALID_ARGUMENT"
    decodes = tls_mesh.workers(scheduler_pb2.WORKER_ROLE_DECODE)
    assert [w.address for w in decodes] == [tls_mesh.decodes[0].address]  # no impostor joined


def test_a_gateway_certificate_cannot_put_into_the_cache(tls_mesh):
    put = cache_pb2.PutRequest(block_hash=b"\0" * 16, data=b"forged")
    with _as(tls_mesh, "gateway", tls_mesh.cache.address) as channel:
        with pytest.raises(grpc.RpcError) as caught:
            cache_pb2_grpc.CacheStub(channel).Put(put, timeout=5)
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "Put is not allowed for role 'gateway'" in caught.value.details()
    with _as(tls_mesh, "decode", tls_mesh.cache.address) as channel:  # a worker's passes to the cache's checks
        assert code_of(lambda: cache_pb2_grpc.CacheStub(channel).Put(put, timeout=5)) != "PERMISSION_DENIED"


def test_the_mesh_with_tls_answers_as_without(tls_mesh, model_dir):
    prompt = [1, 45, 748, 31, 344, 338]
    got, _ = tls_mesh.generate(prompt, 8, ignore_eos=True)
    plain = start_mesh(str(model_dir("llama")), transport="grpc")
    try:
        expected, _ = plain.generate(prompt, 8, ignore_eos=True)
    finally:
        plain.close()
    assert len(got) == 8 and got == expected
    assert tls_mesh.wait_blocks_free(5.0)


def test_an_internal_service_on_a_public_address_needs_tls_or_insecure(procs, tmp_path):
    unset = {"KVMESH_INSECURE": "0", "KVMESH_TLS_DIR": ""}
    refused = procs.launch("scheduler", "--host", "0.0.0.0", env=unset)
    assert refused.wait(30) == 2
    lines = refused.stderr.strip().splitlines()
    assert len(lines) == 1 and "refusing to bind 0.0.0.0 without TLS" in lines[0] and "--tls-dir" in lines[0]
    folder = make_certs(tmp_path / "certs")
    served = procs.start("scheduler", "--host", "0.0.0.0", "--tls-dir", folder, env=unset)  # SERVING over mTLS
    assert health_status(served.address) == "UNAVAILABLE"  # and closed to a plaintext caller


def test_a_missing_certificate_is_one_line_and_exit_2(procs, tmp_path):
    proc = procs.launch("scheduler", "--tls-dir", str(tmp_path), env={"KVMESH_TLS_DIR": ""})
    assert proc.wait(30) == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "missing" in lines[0] and "kvmesh certs init" in lines[0]


@pytest.mark.parametrize("transport", ["grpc", "shm"])
def test_cached_prefixes_reach_workers_over_mtls(model_dir, tmp_path, transport):
    # the cache's puts (worker -> cache) and its deliveries (cache -> worker over KVTransfer) with certificates
    mesh = start_mesh(str(model_dir("llama")), transport=transport, decode_prefix_caching=False,
                      tls_dir=make_certs(tmp_path / "certs"))
    try:
        prompt = [(7 * i) % 900 + 1 for i in range(40)]  # two full blocks of 16 and a tail
        first, _ = mesh.generate(prompt, 6, ignore_eos=True)
        cache = cache_pb2_grpc.CacheStub(mesh.channel(mesh.cache.address))  # the admin certificate may ask
        deadline = time.monotonic() + 60
        while sum(t.num_blocks for t in cache.Stats(cache_pb2.StatsRequest(), timeout=5).tiers) < 2:
            assert time.monotonic() < deadline, "the first request's blocks never reached the cache"
            time.sleep(0.1)
        hits = []
        for _ in range(20):  # the scheduler's cache probe has a short deadline: a loaded machine may miss it
            got, responses = mesh.generate(prompt, 6, ignore_eos=True)
            assert got == first
            hits.append(responses[-1].usage.cached_tokens)
            if hits[-1]:
                break
        assert hits[-1] == 32, hits  # delivered by the cache into the worker's blocks, through its certificate
        assert mesh.wait_blocks_free(5.0)
    finally:
        mesh.close()


@pytest.mark.parametrize(("role", "why"), [
    ("prefill", "may not act for a worker registered as WORKER_ROLE_DECODE"),
    # certificates are per role, so another decode worker's passes the role check; the lease token only the
    # registering process holds is what keeps it from deregistering (or faking the load of) this one
    ("decode", "lease token"),
])
def test_no_other_certificate_can_deregister_or_heartbeat_a_worker(tls_mesh, role, why):
    (decode,) = tls_mesh.workers(scheduler_pb2.WORKER_ROLE_DECODE)
    with _as(tls_mesh, role, tls_mesh.scheduler.address) as channel:
        stub = scheduler_pb2_grpc.SchedulerStub(channel)
        for call in (lambda: stub.Deregister(scheduler_pb2.DeregisterRequest(worker_id=decode.worker_id), timeout=5),
                     lambda: stub.Heartbeat(scheduler_pb2.HeartbeatRequest(worker_id=decode.worker_id), timeout=5)):
            with pytest.raises(grpc.RpcError) as caught:
                call()
            assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
            assert why in caught.value.details()
    assert [w.worker_id for w in tls_mesh.workers(scheduler_pb2.WORKER_ROLE_DECODE)] == [decode.worker_id]
