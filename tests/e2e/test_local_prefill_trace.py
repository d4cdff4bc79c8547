"""Conditional disaggregation, seen in the trace: when slo_aware's plan says the decode worker prefills a prompt
itself (it holds every full block and the tail is short), that request's trace has no prefill hop and no KV
transfer, and both route spans say so (`kvmesh.route.local_prefill`, no prefill worker named); the request that
warmed the pool went through the prefill worker, and its trace shows that hop. Tokens equal HF's both times."""

from __future__ import annotations

import time
import uuid

import pytest
import torch
from transformers import AutoModelForCausalLM

from mesh import start_mesh, wait_for_trace
from kvmesh.services.common import conventions as names
from kvmesh.v1 import common_pb2, gateway_pb2, scheduler_pb2, scheduler_pb2_grpc

BLOCK = 16
MAX_TOKENS = 6
PROMPT = [(i * 37 + 11) % 1000 + 3 for i in range(2 * BLOCK + 3)]  # two full blocks and a 3-token tail
PREFILL_HOP = {names.PREFILL_QUEUE, names.PREFILL_COMPUTE, names.KV_TRANSFER}


@pytest.fixture(scope="module")
def traced(model_dir, tmp_path_factory):
    path = tmp_path_factory.mktemp("traces") / "spans.jsonl"
    env = {"OTEL_TRACES_EXPORTER": "jsonl", "KVMESH_TRACES_FILE": str(path), "OTEL_BSP_SCHEDULE_DELAY": "50"}
    mesh = start_mesh(str(model_dir("llama")), env=env, policy="slo_aware")
    yield mesh, path
    mesh.close()


def _generate(mesh, request_id: str) -> list[int]:
    sampling = common_pb2.SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
    request = gateway_pb2.GenerateRequest(prompt_token_ids=PROMPT, request_id=request_id, sampling=sampling)
    return [t for r in mesh.gateway_stub().Generate(request, timeout=60) for t in r.token_ids]


def _trace_of(path, request_id: str):
    """The request's trace once its decode stream is exported too."""
    return wait_for_trace(path, request_id, lambda trace: names.DECODE_STREAM in {s.name for s in trace.spans})


def test_a_prompt_the_plan_prefills_on_the_decode_worker_has_no_prefill_hop_in_its_trace(traced, model_dir):
    mesh, path = traced
    hf = AutoModelForCausalLM.from_pretrained(model_dir("llama"))
    want = hf.generate(torch.tensor([PROMPT]), max_new_tokens=MAX_TOKENS, do_sample=False, eos_token_id=None,
                       pad_token_id=0)[0, len(PROMPT):].tolist()
    cold = f"cold-{uuid.uuid4().hex}"
    assert _generate(mesh, cold) == want
    cold_names = {s.name for s in _trace_of(path, cold).spans}
    assert PREFILL_HOP <= cold_names  # a fresh prompt: the prefill worker computed it and sent its KV

    stub = scheduler_pb2_grpc.SchedulerStub(mesh.channel(mesh.scheduler.address))
    deadline = time.monotonic() + 10
    while True:  # once a heartbeat carried the decode worker's KV events, the plan is to prefill the tail there
        plan = stub.Route(scheduler_pb2.RouteRequest(prompt_token_ids=PROMPT, dry_run=True), timeout=5)
        if plan.local_prefill:
            break
        assert time.monotonic() < deadline, f"the plan never became a local prefill: {plan}"
        time.sleep(0.1)
    assert plan.num_decode_cached_tokens == 2 * BLOCK and plan.kv_source == "decode_pool"

    warm = f"warm-{uuid.uuid4().hex}"
    assert _generate(mesh, warm) == want
    time.sleep(0.5)  # a prefill hop's spans, were there one, end before the stream's: give them time to arrive
    trace = _trace_of(path, warm)
    assert not PREFILL_HOP & {s.name for s in trace.spans}
    assert "kvmesh-prefill" not in {s.service for s in trace.spans}
    # the gateway's span around the Route call, and the scheduler's server span of it
    routes = {s.service: s for s in trace.spans if (s.service, s.name) in (
        ("kvmesh-gateway", names.SCHEDULER_ROUTE), ("kvmesh-scheduler", "/kvmesh.v1.Scheduler/Route"))}
    assert set(routes) == {"kvmesh-gateway", "kvmesh-scheduler"}
    for span in routes.values():
        assert span.attributes[names.ATTR_ROUTE_LOCAL_PREFILL] is True
        assert span.attributes[names.ATTR_ROUTE_PREFILL] == ""
    assert routes["kvmesh-scheduler"].attributes["kvmesh.route.kv_source"] == "decode_pool"
    assert mesh.wait_blocks_free(5.0)
