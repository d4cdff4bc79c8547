"""The gateway's HTTP API fuzzed from its own OpenAPI schema with schemathesis, on a real mesh.

schemathesis reads `/openapi.json` from the running gateway and generates requests for every operation in it —
conforming bodies and, in its negative phase, bodies that break the schema (wrong types, out-of-range numbers,
missing fields). Every answer must be a 2xx or a 4xx in OpenAI's error shape with a message a person can act on;
never a 5xx, never a traceback. At the end every service still serves, nothing leaked, and the mesh answers a real
request with the same tokens as before the fuzz.

(schemathesis' own pytest plugin does not run under pytest 9, so its hypothesis strategies are driven here with
`given`, one test per generation mode.)

Bodies that would generate for minutes (max_tokens up to 2^31, n and best_of up to 16) are clamped to a few tokens
and candidates before they are sent, so the fixed budget (KVMESH_FUZZ_EXAMPLES per operation) stays a few minutes;
clamping keeps each value's type, so the requests still exercise those fields' validation.
"""

from __future__ import annotations

import os
from collections import Counter

import pytest
import requests
import schemathesis
from schemathesis import GenerationMode
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error

from mesh import start_mesh
from procs import health_status

EXAMPLES = int(os.environ.get("KVMESH_FUZZ_EXAMPLES", "40"))
PROMPT = list(range(5, 40))
STATUSES: Counter = Counter()  # (mode, status) -> answers, printed at the end (RESULTS records a long run)
CLAMPS = {"max_tokens": 3, "max_completion_tokens": 3, "n": 2, "best_of": 2}


@pytest.fixture(scope="module")
def mesh(model_dir):
    mesh = start_mesh(str(model_dir("llama")))
    yield mesh
    mesh.close()


@pytest.fixture(scope="module")
def before(mesh):
    """The tokens a real request gets before any fuzzed request reached the mesh."""
    return mesh.generate(PROMPT, max_tokens=6)[0]


@pytest.fixture(scope="module")
def api_schema(mesh, before):
    return schemathesis.openapi.from_url(f"http://127.0.0.1:{mesh.http_port}/openapi.json")


def _clamp(body) -> None:
    """Bound a generated body's work (see the module docstring); values of another type are left to validation."""
    if not isinstance(body, dict):
        return
    for field, cap in CLAMPS.items():
        value = body.get(field)
        if isinstance(value, int) and not isinstance(value, bool) and value > cap:
            body[field] = cap


def _check_error_shape(response: requests.Response, case) -> None:
    if response.status_code < 400:
        return
    assert "Traceback" not in response.text, f"{case.method} {case.path}: {response.text[:2000]}"
    error = response.json().get("error", {})
    assert isinstance(error.get("message"), str) and error["message"].strip(), \
        f"{case.method} {case.path} -> {response.status_code} without a message: {response.text[:500]}"


@pytest.mark.parametrize("mode", list(GenerationMode), ids=lambda m: m.value)
def test_every_operation_answers_a_status_a_client_can_act_on(api_schema, mode):
    operations = [result.ok() for result in api_schema.get_all_operations()]
    assert {op.path for op in operations} >= {"/v1/completions", "/v1/chat/completions", "/tokenize"}

    @settings(max_examples=EXAMPLES * len(operations), deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    @given(api_schema.as_strategy(mode))
    def fuzz(case):
        _clamp(case.body)
        response = case.call(timeout=60)
        STATUSES[(mode.value, response.status_code)] += 1
        case.validate_response(response, checks=[not_a_server_error])
        _check_error_shape(response, case)

    fuzz()


def test_after_the_schema_fuzz_every_service_serves_and_answers_as_before(mesh, before):
    for proc in [mesh.gateway, mesh.scheduler, mesh.cache, *mesh.prefills, *mesh.decodes]:
        assert health_status(proc.address) == "SERVING", proc.service
        assert proc.proc.poll() is None, f"{proc.service} died: {proc.stderr[-3000:]}"
    assert mesh.generate(PROMPT, max_tokens=6)[0] == before
    assert mesh.wait_blocks_free(30), "a fuzzed request left KV blocks, a handoff or a transfer behind"
    for proc in [mesh.gateway, mesh.scheduler, mesh.cache, *mesh.prefills, *mesh.decodes]:
        assert "Traceback" not in proc.stderr, f"{proc.service}: {proc.stderr[-4000:]}"
    print(f"schema fuzz: {sum(STATUSES.values())} requests, by (mode, status): {sorted(STATUSES.items())}")
