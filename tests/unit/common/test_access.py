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
    ("/kvmesh.v1.Prefill/Prefill", {"decode", "worker"}),
    ("/kvmesh.v1.Cache/Put", {"prefill", "decode", "worker"}),
    ("/kvmesh.v1.Cache/Clear", {"admin"}),
    ("/kvmesh.v1.KVTransfer/Push", {"prefill", "cache", "decode", "worker"}),  # decode: its self-transfer
    ("/kvmesh.v1.Scheduler/Register", {"prefill", "decode", "cache", "worker"}),
    ("/kvmesh.v1.Scheduler/SetWorkerRole", {"admin"}),
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


def _admitted(role: str) -> set[str]:
    return {method for method in [*_methods(), "/grpc.health.v1.Health/Check", "/grpc.health.v1.Health/Watch"]
            if access.refusal(method, role) is None}


def test_a_flexible_worker_certificate_may_do_exactly_what_prefill_or_decode_may():
    assert _admitted("worker") == _admitted("prefill") | _admitted("decode")


@pytest.mark.parametrize("method", [
    "/kvmesh.v1.Scheduler/SetWorkerRole", "/kvmesh.v1.Scheduler/Route", "/kvmesh.v1.Scheduler/Stats",
    "/kvmesh.v1.Decode/Generate", "/kvmesh.v1.Decode/Abort", "/kvmesh.v1.Decode/Stats", "/kvmesh.v1.Prefill/Stats",
    "/kvmesh.v1.Cache/Clear", "/kvmesh.v1.Cache/Stats",
    "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
])
def test_a_flexible_worker_certificate_has_no_admin_gateway_or_cache_rights(method):
    assert "is not allowed for role 'worker'" in access.refusal(method, "worker")


@pytest.mark.parametrize("method", [
    "/kvmesh.v1.Scheduler/Register", "/kvmesh.v1.Scheduler/Heartbeat", "/kvmesh.v1.Scheduler/Deregister",
    "/kvmesh.v1.Scheduler/ListWorkers", "/kvmesh.v1.Scheduler/ReportFailure", "/kvmesh.v1.Prefill/Prefill",
    "/kvmesh.v1.KVTransfer/Open", "/kvmesh.v1.KVTransfer/Push", "/kvmesh.v1.KVTransfer/Commit",
    "/kvmesh.v1.Cache/Lookup", "/kvmesh.v1.Cache/Put", "/kvmesh.v1.Cache/Fetch", "/kvmesh.v1.Cache/Pin",
])
def test_a_flexible_worker_certificate_may_make_a_workers_calls(method):
    assert access.refusal(method, "worker") is None


def test_a_flexible_worker_registers_as_prefill_or_decode_only():
    method, roles = "/kvmesh.v1.Scheduler/Register", scheduler_pb2
    for other in scheduler_pb2.WorkerRole.values():
        text = access.refusal(method, "worker", scheduler_pb2.RegisterRequest(role=other, flexible=True))
        if other in (roles.WORKER_ROLE_PREFILL, roles.WORKER_ROLE_DECODE):
            assert text is None
        else:
            assert "a worker certificate may not Register as" in text and "prefill or decode" in text


@pytest.mark.parametrize("role, other", [("decode", scheduler_pb2.WORKER_ROLE_PREFILL),
                                         ("prefill", scheduler_pb2.WORKER_ROLE_DECODE)])
def test_a_fixed_role_certificate_still_cannot_register_as_the_other_engine_role(role, other):
    for flexible in (False, True):
        text = access.refusal("/kvmesh.v1.Scheduler/Register", role,
                              scheduler_pb2.RegisterRequest(role=other, flexible=flexible))
        assert f"a {role} certificate may not Register as" in text and "needs the worker certificate" in text


def test_a_flexible_worker_acts_for_prefill_and_decode_workers_only():
    assert access.owner_refusal("worker", scheduler_pb2.WORKER_ROLE_PREFILL) is None
    assert access.owner_refusal("worker", scheduler_pb2.WORKER_ROLE_DECODE) is None
    assert "worker certificate may not act for a worker registered as WORKER_ROLE_CACHE" in \
        access.owner_refusal("worker", scheduler_pb2.WORKER_ROLE_CACHE)
    assert access.owner_refusal("decode", scheduler_pb2.WORKER_ROLE_PREFILL) is not None
