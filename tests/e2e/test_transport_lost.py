"""Readiness that stays true: a decode worker whose transport is lost after start (its shared-memory pool
unlinked from /dev/shm, as systemd-logind's RemoveIPC does to a logged-out user's segments) finds out at its next
transport check, turns NOT_SERVING and leaves the scheduler, so no request is routed to a pool no new peer can
map; requests are refused with UNAVAILABLE instead of failing on the transfer."""

import glob
import os
import time

import grpc

from mesh import start_mesh
from procs import health_status
from kvmesh.v1 import scheduler_pb2


def test_a_decode_worker_whose_shm_segment_is_unlinked_goes_not_serving_and_leaves_the_scheduler(model_dir):
    mesh = start_mesh(str(model_dir("llama")), transport="shm", env={"KVMESH_DECODE_TRANSPORT_CHECK_S": "0.5"})
    try:
        decode = mesh.decodes[0]
        tokens, _ = mesh.generate([5, 6, 7, 8], 4)
        assert len(tokens) == 4
        segments = glob.glob(f"/dev/shm/kvmesh-{decode.proc.pid}-*")
        assert segments, "the decode worker has no shared-memory segment"
        for path in segments:
            os.unlink(path)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and (health_status(decode.address) != "NOT_SERVING"
                                               or mesh.workers(scheduler_pb2.WORKER_ROLE_DECODE)):
            time.sleep(0.1)
        assert health_status(decode.address) == "NOT_SERVING"
        assert mesh.workers(scheduler_pb2.WORKER_ROLE_DECODE) == []
        assert "transport lost" in decode.stderr and "shm" in decode.stderr
        try:
            mesh.generate([5, 6, 7, 8], 4)
            raise AssertionError("a request was served by a mesh with no ready decode worker")
        except grpc.RpcError as e:
            assert e.code() == grpc.StatusCode.UNAVAILABLE, e
        assert decode.proc.poll() is None  # alive, only out of routing
    finally:
        mesh.close()
