"""A whole run: the schedule, the concurrency cap, multi-turn order, and `kvmesh bench serve` against a stub."""

import asyncio
import json
import math
import threading

import pytest

from kvmesh.services.bench.client import BenchClient
from kvmesh.services.bench.datasets import BenchRequest, Session
from kvmesh.services.bench.metrics import Slo
from kvmesh.services.bench.progress import Progress
from kvmesh.services.bench.serve import LoadShape, run_load
from kvmesh.services.bench.stub import StubOpenAI
from kvmesh.services.cli import main


class GateClient(BenchClient):
    """Holds every request until released, counting how many are in flight at once."""

    def __init__(self):
        self.in_flight = self.most = 0
        self.log = []
        self.release = asyncio.Event()

    async def send(self, request, result):
        self.in_flight += 1
        self.most = max(self.most, self.in_flight)
        self.log.append(("start", request.session, request.turn))
        await self.release.wait()
        result.ttft_s, result.e2e_s, result.output_tokens = 0.001, 0.002, request.output_len
        result.token_times_s = [0.001] * request.output_len
        self.in_flight -= 1
        self.log.append(("end", request.session, request.turn))


def one_turn(n):
    return [Session([BenchRequest([100], 2, session=i)]) for i in range(n)]


async def run_with_cap(sessions, cap):
    client = GateClient()
    run = asyncio.create_task(run_load(sessions, client, LoadShape(max_concurrency=cap),
                                       progress=Progress(len(sessions), enabled=False)))
    while client.in_flight < min(cap, len(sessions)):  # everything due at once: wait until the cap is reached
        await asyncio.sleep(0)
    client.release.set()
    return await run, client


def test_max_concurrency_caps_requests_in_flight():
    outcome, client = asyncio.run(run_with_cap(one_turn(50), cap=8))
    assert client.most == 8
    assert outcome.summary["completed"] == 50 and outcome.summary["output_tokens"] == 100


def test_a_sessions_turns_run_one_after_another():
    sessions = [Session([BenchRequest([100], 1, session=s, turn=t) for t in range(3)]) for s in range(4)]
    outcome, client = asyncio.run(run_with_cap(sessions, cap=100))
    for s in range(4):
        events = [(kind, t) for kind, session, t in client.log if session == s]
        assert events == [("start", 0), ("end", 0), ("start", 1), ("end", 1), ("start", 2), ("end", 2)]
    assert outcome.summary["completed"] == 12


def test_the_shape_uses_trace_timestamps_unless_a_rate_is_given():
    sessions = [Session([BenchRequest([1], 1, timestamp_ms=t)]) for t in (500.0, 1500.0)]
    assert LoadShape(time_scale=2.0).offsets(sessions) == [0.0, 2.0]
    assert LoadShape(request_rate=4.0, constant=True).offsets(sessions) == [0.0, 0.25]
    assert LoadShape().offsets(one_turn(2)) == [0.0, 0.0]  # no rate, no timestamps: all at once
    assert LoadShape(request_rate=math.inf).offsets(sessions) == [0.0, 0.0]


@pytest.fixture
def stub_url():
    """A stub OpenAI server on its own loop in a thread, as a separate server would be."""
    loop = asyncio.new_event_loop()
    stub = StubOpenAI()
    port = loop.run_until_complete(stub.start())
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{port}", stub
    asyncio.run_coroutine_threadsafe(stub.stop(), loop).result(timeout=30)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(timeout=30)


def test_kvmesh_bench_serve_writes_the_json_contract(stub_url, tmp_path, capsys):
    url, stub = stub_url
    out = tmp_path / "run.json"
    code = main(["bench", "serve", "--base-url", url, "--dataset-name", "multiturn", "--num-prompts", "12",
                 "--multiturn-turns", "3", "--input-len", "8", "--output-len", "uniform:2:5", "--request-rate", "100",
                 "--burstiness", "0.5", "--slo-ttft-ms", "60000", "--slo-tpot-ms", "60000", "--out", str(out),
                 "--plot", str(tmp_path / "run.png")])
    assert code == 0
    data = json.loads(out.read_text())
    assert data["completed"] == 12 and data["failed"] == 0 and data["duration_s"] > 0
    assert data["goodput_rps"] > 0 and data["output_tok_s"] > 0 and data["slo_attainment_pct"] == 100.0
    for key in ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms"):
        assert set(data[key]) >= {"mean", "p50", "p90", "p99"} and data[key]["p50"] is not None
    assert len(data["requests"]) == 12
    assert {b["model"] for b in stub.bodies} == {"stub"}  # no --model: the server's listed one
    assert sum(r["output_tokens"] for r in data["requests"]) == sum(b["max_tokens"] for b in stub.bodies)
    captured = capsys.readouterr()
    assert "Serving Benchmark Result" in captured.out
    try:
        import matplotlib  # noqa: F401
    except ImportError:  # the run's other outputs stand; the missing plot is explained
        assert "needs matplotlib" in captured.err and not (tmp_path / "run.png").exists()
    else:
        assert (tmp_path / "run.png").stat().st_size > 0


def test_a_sweep_reports_goodput_per_rate_and_the_max_rate_at_target(stub_url, tmp_path, capsys):
    url, _ = stub_url
    out = tmp_path / "sweep.json"
    code = main(["bench", "serve", "--base-url", url, "--num-prompts", "10", "--input-len", "4", "--output-len", "2",
                 "--sweep", "50,100", "--slo-ttft-ms", "60000", "--out", str(out), "--no-progress"])
    assert code == 0
    data = json.loads(out.read_text())
    assert [run["request_rate"] for run in data["sweep"]] == [50.0, 100.0]
    assert all(run["completed"] == 10 for run in data["sweep"])
    assert data["max_rate_at_90pct_slo"] == 100.0
    assert "max rate at >= 90% SLO attainment: 100 req/s" in capsys.readouterr().out


def test_summary_counts_failures_by_status():
    class Failing(GateClient):
        async def send(self, request, result):
            result.error = "http_429"

    outcome = asyncio.run(run_load(one_turn(3), Failing(), LoadShape(), Slo(ttft_ms=1),
                                   Progress(3, enabled=False)))
    assert outcome.summary["failed"] == 3 and outcome.summary["errors"] == {"http_429": 3}
    assert outcome.summary["slo_attainment_pct"] == 0.0
