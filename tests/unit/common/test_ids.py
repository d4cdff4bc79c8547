"""The host id a worker registers with is the one its transports negotiate with."""

from kvmesh.services.common import ids
from kvmesh.transports import host_id as transport_host_id


def test_the_registered_host_id_is_the_transports_host_id(monkeypatch):
    monkeypatch.delenv("KVMESH_HOST_ID", raising=False)
    assert ids.host_id() == transport_host_id() and ids.host_id()  # hostname + boot id, not the machine id
    monkeypatch.setenv("KVMESH_HOST_ID", "netns-h0")
    assert ids.host_id() == transport_host_id() == "netns-h0"


def test_instance_ids_are_fresh_per_process_and_request_ids_per_call():
    assert ids.instance_id() == ids.instance_id()
    assert ids.request_id() != ids.request_id()
