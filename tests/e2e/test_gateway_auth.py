"""API keys at the gateway, with real processes: no key or a wrong one gets 401 / UNAUTHENTICATED on every HTTP
route but /health and on every gRPC method; the right key gets the model's greedy tokens; SIGHUP reloads the key
file; a gateway or an internal service asked to bind a public address unprotected refuses to start."""

import signal
import time

import grpc
import httpx
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from transformers import AutoModelForCausalLM, AutoTokenizer

from mesh import free_port, start_mesh
from kvmesh.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc

KEYS = "alice-key team-a\nbob-key team-b\ncarol-key team-a\nold-key team-c\n"
RELOADED = "alice-key team-a\nbob-key team-b\ncarol-key team-a\nnew-key team-c\n"
PROMPT = [(i * 37 + 11) % 900 + 3 for i in range(40)]
MAX_TOKENS = 8
HTTP_ROUTES = [("POST", "/v1/completions"), ("POST", "/v1/chat/completions"), ("GET", "/v1/models"),
               ("GET", "/metrics"), ("GET", "/v1/no-such-route"), ("GET", "/docs")]
BAD_AUTHORIZATION = [None, "Bearer wrong-key", "Bearer alice-key2", "alice-key", "Basic alice-key", "Bearer"]


@pytest.fixture(scope="module")
def key_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("keys") / "api-keys"
    path.write_text(KEYS)
    return path


@pytest.fixture(scope="module")
def mesh(model_dir, key_file):
    m = start_mesh(str(model_dir("llama")), gateway_args=("--api-key-file", str(key_file), "--api-key",
                                                          "flag-key", "--metrics-auth"))
    yield m
    m.close()


def bearer(key: str | None) -> dict:
    return {"Authorization": f"Bearer {key}"} if key else {}


def metadata(authorization: str | None):
    return [("authorization", authorization)] if authorization is not None else None


def call_every_gateway_method(mesh, authorization: str | None) -> dict[str, grpc.StatusCode]:
    """Each Gateway RPC (read from the service's descriptor, so a new one is covered) called with an empty
    request: its status code."""
    stub = mesh.gateway_stub()
    codes = {}
    for method in gateway_pb2.DESCRIPTOR.services_by_name["Gateway"].methods:
        request = getattr(gateway_pb2, method.input_type.name)()
        try:
            reply = getattr(stub, method.name)(request, timeout=10, metadata=metadata(authorization))
            if method.server_streaming:
                list(reply)
            codes[method.name] = grpc.StatusCode.OK
        except grpc.RpcError as e:
            codes[method.name] = e.code()
    return codes


def test_every_http_route_but_health_refuses_a_missing_or_wrong_key(mesh):
    with httpx.Client(base_url=f"http://127.0.0.1:{mesh.http_port}", timeout=10) as http:
        assert http.get("/health").status_code == 200
        for authorization in BAD_AUTHORIZATION:
            headers = {"Authorization": authorization} if authorization else {}
            for method, path in HTTP_ROUTES:
                # a body that would be a 400 (malformed) or 413 (too large) shows the key is checked first
                reply = http.request(method, path, headers=headers, content=b"{not json" * 1_000_000)
                assert reply.status_code == 401, (authorization, path, reply.text)
                assert reply.headers["www-authenticate"] == "Bearer"
                error = reply.json()["error"]
                assert error["code"] == 401 and error["type"] == "invalid_request_error"
                assert "--api-key" in error["message"]
        assert http.get("/v1/models", headers=bearer("alice-key")).status_code == 200
        assert http.get("/metrics", headers=bearer("flag-key")).status_code == 200


def test_every_grpc_method_refuses_a_missing_or_wrong_key_but_health_is_open(mesh):
    for authorization in BAD_AUTHORIZATION:
        codes = call_every_gateway_method(mesh, authorization)
        assert set(codes) == {"Generate", "Tokenize", "ListModels"}
        assert set(codes.values()) == {grpc.StatusCode.UNAUTHENTICATED}, (authorization, codes)
    # bytes that are no protobuf at all: refused for the key, so they were never parsed
    raw = mesh.channel(mesh.gateway.address).unary_unary("/kvmesh.v1.Gateway/Tokenize")
    with pytest.raises(grpc.RpcError) as refused:
        raw(b"\xff\xff\xff not a message", timeout=10)
    assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
    health = health_pb2_grpc.HealthStub(mesh.channel(mesh.gateway.address))
    assert health.Check(health_pb2.HealthCheckRequest(), timeout=5).status == health_pb2.HealthCheckResponse.SERVING
    codes = call_every_gateway_method(mesh, "Bearer alice-key")  # empty requests: refused for what they say
    assert codes["ListModels"] == grpc.StatusCode.OK and codes["Generate"] == grpc.StatusCode.INVALID_ARGUMENT


def test_the_right_key_gets_the_models_greedy_tokens_on_both_apis(mesh, model_dir):
    model = AutoModelForCausalLM.from_pretrained(model_dir("llama"))
    out = model.generate(torch.tensor([PROMPT]), max_new_tokens=MAX_TOKENS, do_sample=False, eos_token_id=None,
                         pad_token_id=0)
    want = out[0, len(PROMPT):].tolist()
    request = gateway_pb2.GenerateRequest(prompt_token_ids=PROMPT, sampling=common_pb2.SamplingParams(
        temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True))
    responses = mesh.gateway_stub().Generate(request, timeout=60, metadata=metadata("Bearer flag-key"))
    assert [t for r in responses for t in r.token_ids] == want
    body = {"prompt": PROMPT, "max_tokens": MAX_TOKENS, "temperature": 0, "ignore_eos": True}
    reply = httpx.post(f"{mesh.http_base}/completions", json=body, headers=bearer("bob-key"), timeout=60)
    assert reply.status_code == 200, reply.text
    text = AutoTokenizer.from_pretrained(model_dir("llama")).decode(want, skip_special_tokens=True)
    assert reply.json()["choices"][0]["text"] == text


def wait_until(condition, timeout_s: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return condition()


def list_models_code(mesh, key: str) -> grpc.StatusCode:
    return call_every_gateway_method(mesh, f"Bearer {key}")["ListModels"]


def http_models_status(mesh, key: str) -> int:
    return httpx.get(f"{mesh.http_base}/models", headers=bearer(key), timeout=10).status_code


def test_sighup_reloads_the_key_file_without_a_restart(mesh, key_file):
    assert list_models_code(mesh, "old-key") == grpc.StatusCode.OK
    assert list_models_code(mesh, "new-key") == grpc.StatusCode.UNAUTHENTICATED
    key_file.write_text(RELOADED)
    mesh.gateway.proc.send_signal(signal.SIGHUP)
    assert wait_until(lambda: list_models_code(mesh, "new-key") == grpc.StatusCode.OK)
    assert list_models_code(mesh, "old-key") == grpc.StatusCode.UNAUTHENTICATED
    assert http_models_status(mesh, "new-key") == 200 and http_models_status(mesh, "old-key") == 401
    assert list_models_code(mesh, "flag-key") == grpc.StatusCode.OK  # keys from flags stay
    key_file.write_text("")  # a file emptied by mistake keeps the keys the gateway had
    mesh.gateway.proc.send_signal(signal.SIGHUP)
    assert wait_until(lambda: "not reloaded" in mesh.gateway.stderr)
    assert mesh.gateway.proc.poll() is None and list_models_code(mesh, "new-key") == grpc.StatusCode.OK


@pytest.mark.parametrize("service, flag", [("gateway", "--api-key"), ("scheduler", "--insecure"),
                                           ("decode", "--insecure")])
def test_a_service_asked_to_bind_a_public_address_unprotected_exits_at_once(procs, model_dir, service, flag):
    model = ["--model", str(model_dir("llama"))] if service != "scheduler" else []
    unset = {"KVMESH_INSECURE": "0", "KVMESH_API_KEY": "", "KVMESH_API_KEY_FILE": ""}  # whatever this shell has
    proc = procs.launch(service, *model, "--host", "0.0.0.0", env=unset)
    assert proc.wait(30) == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"kvmesh {service}: bad configuration: refusing to bind 0.0.0.0")
    assert flag in lines[0] and proc.port == 0  # never listened


def grpc_cached_tokens(mesh, key: str, prompt: list[int], cache_salt: str | None = None) -> int:
    """The cached tokens the gateway reports for one greedy request of prompt under key."""
    request = gateway_pb2.GenerateRequest(prompt_token_ids=prompt, cache_salt=cache_salt,
                                          sampling=common_pb2.SamplingParams(temperature=0.0, max_tokens=2))
    responses = list(mesh.gateway_stub().Generate(request, timeout=60, metadata=metadata(f"Bearer {key}")))
    return responses[-1].usage.cached_tokens


def http_cached_tokens(mesh, key: str, prompt: list[int], cache_salt: str | None = None) -> int:
    body = {"prompt": prompt, "max_tokens": 2, "temperature": 0, **({"cache_salt": cache_salt} if cache_salt else {})}
    reply = httpx.post(f"{mesh.http_base}/completions", json=body, headers=bearer(key), timeout=60)
    assert reply.status_code == 200, reply.text
    return reply.json()["usage"]["prompt_tokens_details"]["cached_tokens"]


@pytest.mark.parametrize("cached_tokens", [grpc_cached_tokens, http_cached_tokens], ids=["grpc", "http"])
def test_two_tenants_never_share_cache_blocks_but_one_tenants_keys_do(mesh, cached_tokens):
    prompt = [(i * 53 + (7 if cached_tokens is grpc_cached_tokens else 8)) % 900 + 3 for i in range(64)]
    assert cached_tokens(mesh, "alice-key", prompt) == 0
    assert cached_tokens(mesh, "carol-key", prompt) >= 48  # team-a's other key: its blocks are there
    assert cached_tokens(mesh, "bob-key", prompt) == 0  # team-b, the same prompt, after team-a's hit
    assert cached_tokens(mesh, "bob-key", prompt) >= 48  # ... which team-b's own second request gets
    assert cached_tokens(mesh, "flag-key", prompt) == 0  # the tenant of keys without one is a tenant too


def test_a_client_salt_stays_inside_its_tenant(mesh):
    prompt = [(i * 61 + 5) % 900 + 3 for i in range(64)]
    assert grpc_cached_tokens(mesh, "alice-key", prompt, cache_salt="s1") == 0
    assert grpc_cached_tokens(mesh, "carol-key", prompt, cache_salt="s1") >= 48
    assert grpc_cached_tokens(mesh, "carol-key", prompt) == 0  # another salt, another namespace
    # salts that spell team-a's namespace, or none at all, never reach its blocks from team-b
    for salt in ("s1", "tenant:6:team-a:s1", ":s1", "team-a:s1"):
        assert grpc_cached_tokens(mesh, "bob-key", prompt, cache_salt=salt) == 0, salt


def test_a_tenant_over_its_rate_limit_gets_429_and_resource_exhausted_while_others_go_on(procs, model_dir, tmp_path):
    keys = tmp_path / "keys"
    keys.write_text("a1 team-a\na2 team-a\nb1 team-b\n")
    scheduler = procs.start("scheduler")
    http_port = free_port()
    gateway = procs.start("gateway", "--scheduler", scheduler.address, "--model", str(model_dir("llama")),
                          "--http-port", str(http_port), "--api-key-file", str(keys), "--rate-limit-rpm", "1",
                          "--rate-limit-burst", "2", timeout_s=120)
    stub = gateway_pb2_grpc.GatewayStub(grpc.insecure_channel(gateway.address))

    def grpc_call(key):
        try:
            stub.ListModels(gateway_pb2.ListModelsRequest(), timeout=10, metadata=metadata(f"Bearer {key}"))
        except grpc.RpcError as e:
            return e.code(), dict(e.trailing_metadata() or ())
        return grpc.StatusCode.OK, {}

    def http_call(key):
        return httpx.get(f"http://127.0.0.1:{http_port}/v1/models", headers=bearer(key), timeout=10)

    assert grpc_call("a1")[0] == grpc.StatusCode.OK and http_call("a2").status_code == 200  # one bucket for both
    code, trailers = grpc_call("a1")
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and int(trailers["retry-after"]) >= 1
    refused = http_call("a2")
    assert refused.status_code == 429 and int(refused.headers["retry-after"]) >= 1
    assert refused.json()["error"]["type"] == "rate_limit_error" and "team-a" in refused.json()["error"]["message"]
    assert http_call("wrong").status_code == 401  # authentication comes first and costs no one a token
    assert grpc_call("b1")[0] == grpc.StatusCode.OK and http_call("b1").status_code == 200  # team-b goes on
    assert httpx.get(f"http://127.0.0.1:{http_port}/health", timeout=10).status_code in (200, 503)  # never limited
