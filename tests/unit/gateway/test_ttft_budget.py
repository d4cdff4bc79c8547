"""The decode worker hears what is left of the client's time-to-first-token objective (it refuses a request still
waiting for KV blocks past it); a request without one says none."""

import time

from kvmesh.services.gateway.core import GenerateCall, decode_request
from kvmesh.v1 import common_pb2, scheduler_pb2


def call(**kwargs):
    return GenerateCall(prompt_token_ids=[1, 2, 3], sampling=common_pb2.SamplingParams(max_tokens=4), **kwargs)


def test_the_budget_is_the_objective_less_the_time_already_spent():
    arrived = time.time_ns() - 500_000_000  # half a second ago
    budget = decode_request(call(slo_ttft_s=2.0, arrival_ns=arrived), scheduler_pb2.RouteResponse()).ttft_budget_seconds
    assert 0 < budget <= 1.5


def test_no_objective_no_budget_and_a_spent_one_is_still_positive():
    assert decode_request(call(), scheduler_pb2.RouteResponse()).ttft_budget_seconds == 0
    spent = call(slo_ttft_s=0.1, arrival_ns=time.time_ns() - 5_000_000_000)
    assert 0 < decode_request(spent, scheduler_pb2.RouteResponse()).ttft_budget_seconds <= 0.01
