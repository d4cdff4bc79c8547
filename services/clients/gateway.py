"""A client of the gateway's gRPC API for the command line (`kvmesh up --once`)."""

from __future__ import annotations

import os

import grpc


def ask_once(address: str, prompt: str, max_tokens: int, api_key: str | None = None) -> int:
    """Send one greedy request through the Gateway's gRPC API (with api_key, when the gateway needs one) and
    print the answer as it streams."""
    from kvmesh.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc

    request = gateway_pb2.GenerateRequest(prompt=prompt, sampling=common_pb2.SamplingParams(
        temperature=0.0, max_tokens=max_tokens))
    print(f"\n> {prompt}", flush=True)
    with grpc.insecure_channel(address) as channel:
        usage = None
        metadata = [("authorization", f"Bearer {api_key}")] if api_key else None
        for response in gateway_pb2_grpc.GatewayStub(channel).Generate(request, timeout=120, metadata=metadata):
            print(response.text, end="", flush=True)
            if response.HasField("usage"):
                usage = response.usage
    print(f"\n[{usage.prompt_tokens} prompt tokens, {usage.completion_tokens} generated]\n" if usage else "\n")
    return 0


def client_key(args) -> str | None:
    """The key `--once` sends: the first given to the gateway (flag, file, or the inherited KVMESH_API_KEY)."""
    from kvmesh.services.common.api_keys import read_key_file

    keys = [*(args.api_key or ()), *(read_key_file(args.api_key_file) if args.api_key_file else ())]
    keys += [k.strip() for k in os.environ.get("KVMESH_API_KEY", "").split(",") if k.strip()]
    return keys[0] if keys else None
