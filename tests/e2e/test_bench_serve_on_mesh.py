"""`kvmesh bench serve` against a real mesh on the tiny model, over both APIs, replaying a `trace-gen` trace."""

import json
import subprocess
import sys

import pytest

from mesh import start_mesh

NUM_REQUESTS = 6
BLOCK = 16


def kvmesh(*args: str, timeout_s: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kvmesh.services.cli", *args], capture_output=True, text=True,
                          timeout=timeout_s)


@pytest.fixture(scope="module")
def mesh(model_dir):
    m = start_mesh(str(model_dir("llama")), prefill=1, decode=1)
    yield m
    m.close()


@pytest.fixture(scope="module")
def trace(tmp_path_factory):
    path = tmp_path_factory.mktemp("trace") / "trace.jsonl"
    made = kvmesh("bench", "trace-gen", "--out", str(path), "--num-requests", str(NUM_REQUESTS), "--rate", "20",
                  "--input-len", "uniform:20:60", "--output-len", "uniform:3:6", "--prefix-reuse", "0.5",
                  "--num-system-prompts", "1", "--turns", "2", "--turn-interval-s", "0.05",
                  "--block-size", str(BLOCK), "--seed", "1")
    assert made.returncode == 0, made.stderr
    return path, [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.parametrize("api", ["http", "grpc"])
def test_bench_serve_replays_a_trace_with_no_error(mesh, trace, api, tmp_path):
    path, records = trace
    base_url = f"http://127.0.0.1:{mesh.http_port}" if api == "http" else mesh.gateway.address
    out = tmp_path / "run.json"
    run = kvmesh("bench", "serve", "--api", api, "--base-url", base_url, "--dataset-name", "mooncake",
                 "--dataset-path", str(path), "--trace-block-size", str(BLOCK), "--time-scale", "0.5",
                 "--slo-ttft-ms", "60000", "--slo-tpot-ms", "60000", "--out", str(out), "--no-progress")
    assert run.returncode == 0, run.stdout + run.stderr
    data = json.loads(out.read_text())
    assert data["completed"] == NUM_REQUESTS and data["failed"] == 0, data["errors"]
    asked = sorted(r["output_length"] for r in records)
    assert sorted(r["output_tokens"] for r in data["requests"]) == asked  # ignore_eos held every length
    assert all(r["output_tokens"] == r["output_tokens_asked"] for r in data["requests"])
    assert sorted(r["prompt_tokens"] for r in data["requests"]) == sorted(r["input_length"] for r in records)
    assert data["duration_s"] > 0 and data["output_tok_s"] > 0 and data["goodput_rps"] > 0
    for key in ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms"):
        assert all(isinstance(data[key][stat], float) for stat in ("mean", "p50", "p90", "p99"))
    assert data["cached_prompt_tokens"] is not None
    assert "Serving Benchmark Result" in run.stdout
