"""The one table of who may call what with mTLS on: it covers every internal RPC and follows the call graph."""

import pytest

from kvmesh.services.common import access
from kvmesh.v1 import cache_pb2, decode_pb2, kv_pb2, prefill_pb2, scheduler_pb2

INTERNAL = (scheduler_pb2, decode_pb2, prefill_pb2, kv_pb2, cache_pb2)


def _methods():
    for module in INTERNAL:
        for service in module.DESCRIPTOR.services_by_name.values():
            for method in service.methods:
                yield f"/{service.full_name}/{method.name}"


@pytest.mark.parametrize("method", list(_methods()))
def test_every_internal_rpc_has_a_rule_that_admits_someone(method):
    assert access.rule_for(method).roles, f"{method} has no rule: add it to access.TABLE"


def test_an_rpc_not_in_the_table_admits_no_one():
    for role in access.ANY:
        assert "not allowed" in access.refusal("/kvmesh.v1.Scheduler/SomethingNew", role)


@pytest.mark.parametrize("method, allowed", [
    ("/kvmesh.v1.Scheduler/Route", {"gateway"}),
    ("/kvmesh.v1.Decode/Generate", {"gateway"}),
    ("/kvmesh.v1.Prefill/Prefill", {"decode"}),
    ("/kvmesh.v1.Cache/Put", {"prefill", "decode"}),
    ("/kvmesh.v1.Cache/Clear", {"admin"}),
    ("/kvmesh.v1.KVTransfer/Push", {"prefill", "cache", "decode"}),  # decode: its readiness self-transfer
    ("/kvmesh.v1.Scheduler/Register", {"prefill", "decode", "cache"}),
])
def test_only_the_roles_of_the_call_graph_may_call(method, allowed):
    admitted = {role for role in access.ANY if access.refusal(method, role) is None}
    assert admitted == allowed


@pytest.mark.parametrize("role, as_role", [("prefill", scheduler_pb2.WORKER_ROLE_PREFILL),
                                           ("decode", scheduler_pb2.WORKER_ROLE_DECODE),
                                           ("cache", scheduler_pb2.WORKER_ROLE_CACHE)])
def test_a_worker_registers_only_as_the_role_its_certificate_names(role, as_role):
    method = "/kvmesh.v1.Scheduler/Register"
    for other in scheduler_pb2.WorkerRole.values():
        text = access.refusal(method, role, scheduler_pb2.RegisterRequest(role=other))
        if other == as_role:
            assert text is None
        else:
            assert f"a {role} certificate may not Register as" in text


def test_a_certificate_without_a_role_is_refused_with_the_fix():
    assert "names no kvmesh role" in access.refusal("/grpc.health.v1.Health/Check", None)
    assert access.refusal("/grpc.health.v1.Health/Check", "gateway") is None


def test_a_worker_acts_only_for_workers_of_its_own_role():
    decode = scheduler_pb2.WORKER_ROLE_DECODE
    assert access.owner_refusal("decode", decode) is None
    assert access.owner_refusal("admin", decode) is None  # operators may deregister anyone
    assert access.owner_refusal(None, decode) is None  # no mTLS: no role to check
    assert "prefill certificate may not act for a worker registered as WORKER_ROLE_DECODE" in \
        access.owner_refusal("prefill", decode)
