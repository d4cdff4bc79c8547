"""Region allocation, shm segment lifetime (close, crash, SIGTERM) and the host id."""

import signal
import subprocess
import sys

import pytest

from kvmesh.transports import allocate_region, host_id
from kvmesh.transports.region import check_region, make_layout
from kvmesh.transports.shm import list_segments, open_segment, reclaim_stale_segments

MAKE_SEGMENT = """
import os, sys, time
from kvmesh.transports import allocate_region
region = allocate_region(2, 4, 64, "shm")
print(region.name, flush=True)
if sys.argv[1] == "crash":
    os._exit(1)
time.sleep(30)
"""


def test_grpc_region_is_plain_memory_and_shm_region_is_a_segment_unlinked_on_close():
    local = allocate_region(2, 8, 64, "grpc")
    assert local.array.shape == (2, 2, 8, 64) and local.name == ""
    shared = allocate_region(2, 8, 64, ["shm", "grpc"])
    assert shared.name in list_segments()
    shared.array[1, 0, 3] = 9
    peer_view, mem = open_segment(shared.name, (2, 2, 8, 64))
    assert peer_view[1, 0, 3].tolist() == [9] * 64  # a second mapping sees the same bytes
    del peer_view
    mem.close()
    shared.close()
    shared.close()  # idempotent
    assert shared.name not in list_segments()


def test_segments_of_a_crashed_owner_are_reclaimed():
    proc = subprocess.run([sys.executable, "-c", MAKE_SEGMENT, "crash"], capture_output=True, text=True, timeout=20)
    name = proc.stdout.strip()
    assert name in list_segments()
    assert name in reclaim_stale_segments()
    assert name not in list_segments()


def test_sigterm_unlinks_the_owners_segments():
    proc = subprocess.Popen([sys.executable, "-c", MAKE_SEGMENT, "wait"], stdout=subprocess.PIPE, text=True)
    name = proc.stdout.readline().strip()
    assert name in list_segments()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(10) == -signal.SIGTERM
    assert name not in list_segments()


def test_region_must_fit_the_layout():
    layout = make_layout(2, 4, 2, 8, "float32")  # 256-byte blocks
    region = allocate_region(2, 4, 256)
    check_region(region, layout)
    with pytest.raises(ValueError):
        check_region(allocate_region(2, 4, 128), layout)
    with pytest.raises(ValueError):
        allocate_region(0, 4, 256)


def test_host_id_is_stable_and_overridable(monkeypatch):
    assert host_id() == host_id() and host_id()
    monkeypatch.setenv("KVMESH_HOST_ID", "rack7-node3")
    assert host_id() == "rack7-node3"
