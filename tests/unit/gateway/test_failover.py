"""The gateway's attempts at one request: which failures place it again, what the next attempt sends, and the usage
the client is told after a migration."""

import time

import grpc

from kvmesh.services.common.errors import (CapacityError, ChecksumError, InvalidArgumentError, MeshError,
                                           UnavailableError)
from kvmesh.services.gateway.core import GenerateCall
from kvmesh.services.gateway.failover import Attempts
from kvmesh.v1 import common_pb2, decode_pb2, scheduler_pb2

ROUTE = scheduler_pb2.RouteResponse(prefill=scheduler_pb2.WorkerInfo(worker_id="prefill-1"),
                                    decode=scheduler_pb2.WorkerInfo(worker_id="decode-1"))


def attempts(retry_limit=1, migration_limit=2, max_tokens=10, seconds=60.0) -> Attempts:
    call = GenerateCall([5, 6, 7], common_pb2.SamplingParams(temperature=0.0, max_tokens=max_tokens),
                        request_id="req")
    return Attempts(call, max_tokens, retry_limit, migration_limit, deadline=time.monotonic() + seconds)


def test_a_failure_before_the_first_token_is_routed_again_once_avoiding_both_workers():
    a = attempts()
    assert a.next_call() is a.call
    assert a.again(UnavailableError("prefill worker gone"), ROUTE)
    retry = a.next_call()
    assert retry.prompt_token_ids == [5, 6, 7] and retry.request_id == "req.1"
    assert a.avoid == {"prefill-1", "decode-1"}
    assert not a.again(UnavailableError("again"), ROUTE)  # retry_limit 1


def test_what_the_client_sent_admission_and_the_requests_own_deadline_are_final():
    assert not attempts().again(InvalidArgumentError("bad"), ROUTE)
    assert not attempts().again(CapacityError("full"), ROUTE)
    assert not attempts(seconds=-1).again(UnavailableError("gone"), ROUTE)
    assert attempts().again(ChecksumError("checksum"), ROUTE)


def test_a_migration_sends_the_prompt_and_the_relayed_tokens_and_asks_only_for_the_rest():
    a = attempts(max_tokens=10)
    a.relayed(decode_pb2.DecodeResponse(token_ids=[100, 101]))
    a.relayed(decode_pb2.DecodeResponse(token_ids=[102]))
    assert a.again(MeshError.with_status(grpc.StatusCode.UNAVAILABLE, "decode worker gone"), ROUTE)
    assert a.avoid == {"decode-1"}  # the prefill is done: only the decode worker failed
    nxt = a.next_call()
    assert nxt.prompt_token_ids == [5, 6, 7, 100, 101, 102]
    assert nxt.sampling.max_tokens == 7 and nxt.sampling.temperature == 0.0
    assert a.call.sampling.max_tokens == 10  # the client's call is left as it was
    final = a.relayed(decode_pb2.DecodeResponse(token_ids=[103], finish_reason=common_pb2.FINISH_REASON_LENGTH,
                                                usage=common_pb2.Usage(prompt_tokens=6, completion_tokens=1,
                                                                       cached_tokens=6)))
    assert (final.usage.prompt_tokens, final.usage.completion_tokens, final.usage.cached_tokens) == (3, 4, 3)


def test_migrations_stop_at_their_limit_and_when_every_token_was_relayed():
    a = attempts(migration_limit=1, max_tokens=3)
    a.relayed(decode_pb2.DecodeResponse(token_ids=[1]))
    assert a.again(UnavailableError("gone"), ROUTE)
    assert not a.again(UnavailableError("gone"), ROUTE)
    b = attempts(max_tokens=2)
    b.relayed(decode_pb2.DecodeResponse(token_ids=[1, 2]))
    assert not b.again(UnavailableError("gone before its final message"), ROUTE)


def test_the_last_failure_is_raised_when_a_retry_finds_no_worker():
    a = attempts()
    error = UnavailableError("prefill worker 127.0.0.1:1 unreachable")
    a.again(error, ROUTE)
    a.last_error = error
    try:
        a.raise_last()
    except UnavailableError as raised:
        assert raised is error
    else:
        raise AssertionError("raise_last raised nothing")


def test_a_migrated_constrained_request_resumes_its_grammar_after_the_relayed_tokens():
    a = attempts(migration_limit=2)
    a.call.sampling.structured_output.regex = "[a-z]+"
    a.relayed(decode_pb2.DecodeResponse(token_ids=[100, 101]))
    assert a.again(UnavailableError("decode worker gone"), ROUTE)
    first = a.next_call()
    assert first.sampling.structured_output.num_resumed_tokens == 2
    assert first.sampling.structured_output.regex == "[a-z]+"
    a.relayed(decode_pb2.DecodeResponse(token_ids=[102]))
    assert a.again(UnavailableError("gone again"), ROUTE)
    assert a.next_call().sampling.structured_output.num_resumed_tokens == 3  # every token relayed, not the last hop's
    assert a.call.sampling.structured_output.num_resumed_tokens == 0  # the client's call is left as it was
