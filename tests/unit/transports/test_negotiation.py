"""Which backend a sender picks for a receiver's descriptor; the registry."""

import pytest

from kvmesh.transports import BACKENDS, NoCommonBackend, allocate_region, available_backends, make_layout
from kvmesh.transports.sender import Sender
from kvmesh.transports import backend_class
from kvmesh.v1 import common_pb2

LAYOUT = make_layout(2, 4, 2, 8, "float32")


@pytest.fixture
def sender_for():
    region = allocate_region(2, 8, 256)

    def make(**kw) -> Sender:
        return Sender(region, LAYOUT, host_id="host-a", **kw)

    yield make
    region.close()


def descriptor(backends, host="host-a"):
    return common_pb2.TransportDescriptor(backends=backends, host_id=host, address="127.0.0.1:1", layout=LAYOUT)


def test_same_host_prefers_shm_and_other_hosts_fall_back(sender_for):
    sender = sender_for()
    assert sender.choose_backend(descriptor(["shm", "grpc"])) == "shm"
    assert sender.choose_backend(descriptor(["shm", "grpc"], host="host-b")) == "grpc"
    assert sender_for(force="grpc").choose_backend(descriptor(["shm", "grpc"])) == "grpc"


def test_no_common_backend_is_a_typed_error(sender_for):
    with pytest.raises(NoCommonBackend):
        sender_for().choose_backend(descriptor(["shm"], host="host-b"))
    with pytest.raises(NoCommonBackend):
        sender_for(backends=["grpc"]).choose_backend(descriptor(["shm"]))
    with pytest.raises(NoCommonBackend):
        sender_for(force="shm").choose_backend(descriptor(["grpc"]))


def test_registry_lists_every_backend_with_flags():
    assert {"grpc", "shm", "ucx"} <= set(BACKENDS)
    assert backend_class("shm").same_host_only
    shared = backend_class("shm").make_region((1, 2, 1, 64))  # shm needs the receiver's pool in shared memory
    assert shared is not None and shared.name and backend_class("grpc").make_region((1, 2, 1, 64)) is None
    shared.close()
    assert not backend_class("grpc").one_sided
    assert available_backends()[-1] == "grpc" and "shm" in available_backends()
    with pytest.raises(ValueError):
        backend_class("carrier-pigeon")
