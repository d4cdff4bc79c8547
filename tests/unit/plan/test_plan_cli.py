"""`kvmesh plan profile` on the tiny model and `kvmesh plan --json` end to end, as an operator runs them."""

from __future__ import annotations

import json
import subprocess
import sys

from kvmesh.services.plan.costs import Profile
from kvmesh.services.plan.trace import Arrival, read_trace, write_trace


def kvmesh(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kvmesh.services.cli", *args], capture_output=True, text=True,
                          timeout=240)


def test_profile_quick_writes_positive_fits(model_dir, tmp_path):
    out = tmp_path / "profile.json"
    done = kvmesh("plan", "profile", "--model", str(model_dir()), "--quick", "--out", str(out))
    assert done.returncode == 0, done.stderr
    raw = json.loads(out.read_text())
    for role in ("prefill", "decode"):
        fit = raw[role]
        assert min(fit.values()) >= 0  # a fit never prices work negative, however noisy the loaded machine
        assert fit["b"] + fit["c"] > 0  # a step costs more as it carries more tokens
        assert raw["samples"][role] and all(s["seconds"] > 0 for s in raw["samples"][role])
    assert raw["kv_bytes_per_token"] > 0 and raw["transfer_gbps"] > 0 and "flags" in raw["cpu"]
    profile = Profile.load(out)
    assert profile.prefill.seconds(512) > profile.prefill.seconds(16)
    assert "profiling" in done.stderr  # progress


def test_plan_json_end_to_end(tmp_path):
    from kvmesh.services.plan.costs import DecodeModel, PrefillModel

    profile = tmp_path / "profile.json"
    Profile(PrefillModel(0.005, 2e-4, 1e-8), DecodeModel(0.02, 1e-3, 1e-6), 2048, 3.0).save(profile)
    trace = tmp_path / "trace.jsonl"
    write_trace(trace, [Arrival(i * 0.2, 300 + 10 * i, 16, (i % 3, 100 + i)) for i in range(40)])
    assert len(read_trace(trace)) == 40
    done = kvmesh("plan", "--profile", str(profile), "--trace", str(trace), "--slo-ttft-ms", "400",
                  "--slo-tpot-ms", "50", "--cores", "2", "--json", "--top", "3")
    assert done.returncode == 0, done.stderr
    rows = json.loads(done.stdout)
    assert 1 <= len(rows) <= 3
    for row in rows:
        assert ("colocated" in row) or (row["prefill"] >= 1 and row["decode"] >= 1)
        assert row["cores"] <= 2 and row["goodput_rps"] >= 0
        for metric in ("ttft_ms", "tpot_ms"):
            assert set(row["predicted"][metric]) >= {"p50", "p90"}
        assert row["command"].split("kvmesh up", 1)[1].startswith(" --")
    per_core = [r["goodput_per_core"] for r in rows]
    assert per_core == sorted(per_core, reverse=True)


def test_plan_without_a_workload_says_what_is_missing(tmp_path):
    done = kvmesh("plan", "--profile", str(tmp_path / "p.json"), "--slo-ttft-ms", "1", "--slo-tpot-ms", "1",
                  "--cores", "2")
    assert done.returncode == 2 and "--trace" in done.stderr
