"""The server skeleton as a real process: health, config printing, env vars, SIGTERM, a taken port."""

import json
import socket
import time

import grpc

from kvmesh.v1 import cache_pb2, cache_pb2_grpc, common_pb2, scheduler_pb2, scheduler_pb2_grpc
from procs import health_status

LAYOUT = common_pb2.KVLayout(model_id="tiny", dtype="float32", block_size=16, num_layers=2, num_kv_heads=2,
                             head_dim=8)


def config_line(proc) -> dict:
    return json.loads(next(line for line in proc.stdout_lines if line.startswith("{")))


def test_scheduler_serves_health_and_prints_its_config(procs):
    scheduler = procs.start("scheduler", "--lease-s", "7")
    assert health_status(scheduler.address) == "SERVING"
    assert health_status(scheduler.address, "kvmesh.v1.Scheduler") == "SERVING"
    config = config_line(scheduler)
    assert config["config"] == "SchedulerConfig"
    assert config["lease_s"] == 7.0 and config["policy"] == "slo_aware"  # the default
    scheduler.stop()


def test_sigterm_drains_and_exits_zero_within_the_grace_period(procs):
    scheduler = procs.start("scheduler", "--grace-s", "2")
    started = time.monotonic()
    scheduler.stop(timeout_s=4)
    assert time.monotonic() - started < 4
    assert health_status(scheduler.address, timeout_s=0.5) == "UNAVAILABLE"


def test_port_in_use_fails_fast_with_one_line(procs):
    # "fast" against this machine, measured now: no slower than a scheduler takes to start and serve (a loaded
    # 2-core machine takes 6 s just to import and start one), so a bind retried or waited on would show
    started = time.monotonic()
    healthy = procs.start("scheduler")
    healthy_start_s = time.monotonic() - started
    healthy.stop()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        started = time.monotonic()
        proc = procs.launch("scheduler", port=port)
        code = proc.wait(timeout_s=60)
    failed_s = time.monotonic() - started
    assert code != 0
    assert failed_s < 1.5 * healthy_start_s + 1, f"failed after {failed_s:.1f}s; a healthy start took " \
                                                 f"{healthy_start_s:.1f}s"
    assert proc.stderr.strip().count("\n") == 0, proc.stderr
    assert "already in use" in proc.stderr


def test_second_scheduler_on_the_same_port_fails(procs):
    first = procs.start("scheduler")
    second = procs.launch("scheduler", port=first.port)
    assert second.wait(timeout_s=10) != 0
    assert health_status(first.address) == "SERVING"
    first.stop()


def test_kvmesh_env_vars_are_honoured(procs):
    scheduler = procs.start("scheduler", env={"KVMESH_SCHEDULER_LEASE_S": "3.5", "KVMESH_MAX_QUEUE": "9"})
    config = config_line(scheduler)
    assert config["lease_s"] == 3.5 and config["max_queue"] == 9
    with grpc.insecure_channel(scheduler.address) as channel:
        reply = scheduler_pb2_grpc.SchedulerStub(channel).Register(scheduler_pb2.RegisterRequest(
            role=scheduler_pb2.WORKER_ROLE_DECODE, address="127.0.0.1:1", layout=LAYOUT), timeout=5)
    assert reply.lease_seconds == 3.5
    scheduler.stop()


def test_bad_config_exits_with_a_one_line_error(procs):
    proc = procs.launch("scheduler", "--lease-s", "-1")
    assert proc.wait(timeout_s=10) == 2
    assert "lease_s must be > 0" in proc.stderr and proc.stderr.strip().count("\n") == 0


def _workers(address: str) -> list:
    with grpc.insecure_channel(address) as channel:
        stub = scheduler_pb2_grpc.SchedulerStub(channel)
        return list(stub.ListWorkers(scheduler_pb2.ListWorkersRequest(), timeout=5).workers)


def _wait_for(predicate, timeout_s: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return False


def test_cache_registers_serves_blocks_and_deregisters_on_sigterm(procs):
    scheduler = procs.start("scheduler", "--lease-s", "2")
    cache = procs.start("cache", "--scheduler", scheduler.address, "--dram-bytes", "4096")
    assert _wait_for(lambda: [w.address for w in _workers(scheduler.address)] == [cache.address])
    import xxhash

    data = bytes(range(256)) * 16  # one block of LAYOUT: 2 * 2 layers * 16 tokens * 2 heads * 8 dims * 4 bytes
    with grpc.insecure_channel(cache.address) as channel:
        stub = cache_pb2_grpc.CacheStub(channel)
        stub.Put(cache_pb2.PutRequest(layout=LAYOUT, block_hash=b"h1", data=data,
                                      checksum=xxhash.xxh3_64_intdigest(data)), timeout=5)
        blocks = list(stub.Get(cache_pb2.GetRequest(layout=LAYOUT, block_hashes=[b"h1", b"h2"]), timeout=5))
    assert [(b.block_hash, b.data) for b in blocks] == [(b"h1", data)]
    cache.stop()
    assert _workers(scheduler.address) == []
    scheduler.stop()


def test_cache_registers_again_after_the_scheduler_restarts(procs):
    scheduler = procs.start("scheduler", "--lease-s", "1")
    cache = procs.start("cache", "--scheduler", scheduler.address)
    assert _wait_for(lambda: len(_workers(scheduler.address)) == 1)
    scheduler.stop()
    restarted = procs.start("scheduler", "--lease-s", "1", "--port", str(scheduler.port))
    assert _wait_for(lambda: [w.address for w in _workers(restarted.address)] == [cache.address])
    cache.stop()
    restarted.stop()


def test_a_worker_that_stops_heartbeating_is_dropped(procs):
    scheduler = procs.start("scheduler", "--lease-s", "1")
    with grpc.insecure_channel(scheduler.address) as channel:
        stub = scheduler_pb2_grpc.SchedulerStub(channel)
        reply = stub.Register(scheduler_pb2.RegisterRequest(
            role=scheduler_pb2.WORKER_ROLE_DECODE, address="127.0.0.1:1", layout=LAYOUT), timeout=5)
        stub.Heartbeat(scheduler_pb2.HeartbeatRequest(worker_id=reply.worker_id, lease_token=reply.lease_token), timeout=5)
        assert len(_workers(scheduler.address)) == 1
        assert _wait_for(lambda: _workers(scheduler.address) == [], timeout_s=5)
        try:
            stub.Heartbeat(scheduler_pb2.HeartbeatRequest(worker_id=reply.worker_id, lease_token=reply.lease_token), timeout=5)
            raise AssertionError("heartbeat of a dropped worker succeeded")
        except grpc.RpcError as exc:
            assert exc.code() == grpc.StatusCode.NOT_FOUND
    scheduler.stop()
