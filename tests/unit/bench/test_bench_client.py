"""The benchmark's clients against real servers on 127.0.0.1: a stub OpenAI SSE server and a stub gRPC gateway,
both in this process, so the client's clock can be checked against the moment the server wrote each token."""

import asyncio
import time

import grpc
import pytest

from kvmesh.services.bench.client import GrpcClient
from kvmesh.services.bench.http_native import HttpClient
from kvmesh.services.bench.httpx_client import HttpxClient
from kvmesh.services.bench.datasets import BenchRequest
from kvmesh.services.bench.metrics import RequestResult
from kvmesh.services.bench.stub import StubOpenAI
from kvmesh.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc

FIRST_TOKEN_DELAY_S = 0.05
ITL_S = 0.01


HTTP_CLIENTS = [HttpClient, HttpxClient]


async def http_run(stub: StubOpenAI, requests: list[BenchRequest], client_cls=HttpClient):
    port = await stub.start()
    client = client_cls(f"http://127.0.0.1:{port}", "m", timeout_s=30, max_connections=16)
    results = [RequestResult() for _ in requests]
    starts = []

    async def one(request, result):
        starts.append(time.perf_counter())
        await client.send(request, result)

    try:
        await asyncio.gather(*(one(q, r) for q, r in zip(requests, results)))
    finally:
        await client.close()
        await stub.stop()
    return results, starts


@pytest.mark.parametrize("client_cls", HTTP_CLIENTS)
def test_http_client_measures_ttft_and_every_inter_token_gap(client_cls):
    stub = StubOpenAI(first_token_delay_s=FIRST_TOKEN_DELAY_S, itl_s=ITL_S)
    request = BenchRequest(prompt_ids=[101, 102, 103], output_len=6)
    (result,), _ = asyncio.run(http_run(stub, [request], client_cls))
    assert result.ok and result.output_tokens == 6 and result.cached_tokens == 0
    assert len(result.token_times_s) == 6 and len(result.itl_s) == 5
    # sleeps never end early, so these bounds hold however loaded the machine is
    assert result.ttft_s >= FIRST_TOKEN_DELAY_S
    assert all(gap >= 0 for gap in result.itl_s)
    # every token was seen after the server wrote it: the client's clock starts before the request leaves, so
    # before the first write, hence seen_i >= sent_i - client_start >= sent_i - sent_0 (the test's own start time
    # comes earlier still, and a loaded machine may pause between it and the client's, so it bounds nothing)
    (written,) = stub.sent
    assert all(seen >= sent - written[0] for seen, sent in zip(result.token_times_s, written))
    assert result.e2e_s >= result.token_times_s[-1] >= result.ttft_s
    assert stub.bodies[0]["prompt"] == [101, 102, 103]
    assert stub.bodies[0]["ignore_eos"] is True and stub.bodies[0]["stream"] is True
    assert stub.bodies[0]["max_tokens"] == 6 and stub.bodies[0]["model"] == "m"


@pytest.mark.parametrize("client_cls", HTTP_CLIENTS)
def test_http_client_holds_many_streams_at_once_on_reused_connections(client_cls):
    stub = StubOpenAI(first_token_delay_s=0.0)
    requests = [BenchRequest([100 + i], output_len=3) for i in range(200)]
    results, _ = asyncio.run(http_run(stub, requests, client_cls))
    assert all(r.ok and r.output_tokens == 3 for r in results)
    assert stub.num_connections <= 16  # the pool's cap: 200 requests over kept-alive connections
    assert sorted(tuple(b["prompt"]) for b in stub.bodies) == sorted(tuple(q.prompt_ids) for q in requests)


def test_the_native_client_holds_thousands_of_streams_in_flight():
    num = 2000

    async def run():
        stub = StubOpenAI()
        stub.gate = asyncio.Event()
        port = await stub.start()
        client = HttpClient(f"http://127.0.0.1:{port}", None, timeout_s=120, max_connections=num)
        results = [RequestResult() for _ in range(num)]
        sends = asyncio.gather(*(client.send(BenchRequest([100], 2), r) for r in results))
        while stub.num_waiting < num and not sends.done():  # every stream open, waiting for its first token
            await asyncio.sleep(0.01)
        stub.gate.set()
        await sends
        await client.close()
        await stub.stop()
        return results, stub

    results, stub = asyncio.run(run())
    assert all(r.ok and r.output_tokens == 2 for r in results)
    assert stub.num_connections == num


@pytest.mark.parametrize("client_cls", HTTP_CLIENTS)
def test_http_errors_are_named_by_status(client_cls):
    stub = StubOpenAI(fail_status=503)
    results, _ = asyncio.run(http_run(stub, [BenchRequest([100], 4)] * 3, client_cls))
    assert [r.error for r in results] == ["http_503"] * 3 and results[0].ttft_s is None


@pytest.mark.parametrize("client_cls", HTTP_CLIENTS)
def test_an_http_stream_that_ends_without_done_is_incomplete(client_cls):
    results, _ = asyncio.run(http_run(StubOpenAI(cut_after=2), [BenchRequest([100], 4)], client_cls))
    assert results[0].error == "incomplete" and len(results[0].token_times_s) == 2


class StubGateway(gateway_pb2_grpc.GatewayServicer):
    """Streams one token per message, then a final message with usage; refuses prompts starting with 0."""

    def __init__(self):
        self.requests = []

    async def Generate(self, request, context):
        self.requests.append(request)
        if request.prompt_token_ids[0] == 0:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "full")
        n = request.sampling.max_tokens
        for i in range(n):
            await asyncio.sleep(FIRST_TOKEN_DELAY_S if i == 0 else ITL_S)
            yield gateway_pb2.GenerateResponse(token_ids=[7])
        yield gateway_pb2.GenerateResponse(finish_reason=common_pb2.FINISH_REASON_LENGTH,
                                           usage=common_pb2.Usage(prompt_tokens=3, completion_tokens=n,
                                                                  cached_tokens=2))


async def grpc_run(requests):
    server = grpc.aio.server()
    servicer = StubGateway()
    gateway_pb2_grpc.add_GatewayServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    client = GrpcClient(f"127.0.0.1:{port}", None, timeout_s=30)
    results = [RequestResult() for _ in requests]
    try:
        await asyncio.gather(*(client.send(q, r) for q, r in zip(requests, results)))
    finally:
        await client.close()
        await server.stop(None)
    return results, servicer


def test_grpc_client_measures_tokens_and_reads_cached_tokens():
    results, servicer = asyncio.run(grpc_run([BenchRequest([5, 6, 7], 4), BenchRequest([0, 1], 4)]))
    good, refused = results
    assert good.ok and good.output_tokens == 4 and good.cached_tokens == 2
    assert good.ttft_s >= FIRST_TOKEN_DELAY_S and len(good.itl_s) == 3 and all(g >= 0 for g in good.itl_s)
    assert refused.error == "RESOURCE_EXHAUSTED"
    sent = {tuple(r.prompt_token_ids): r for r in servicer.requests}
    assert sent[(5, 6, 7)].sampling.ignore_eos and sent[(5, 6, 7)].sampling.max_tokens == 4


@pytest.mark.parametrize("url", ["grpc://127.0.0.1:5", "http://127.0.0.1:5", "127.0.0.1:5"])
def test_grpc_targets_drop_the_scheme(url):
    from kvmesh.services.bench.client import grpc_target

    assert grpc_target(url) == "127.0.0.1:5"
