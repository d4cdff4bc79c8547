"""The chaos soak, short: `bench/chaos.py` against `kvmesh up --prefill 2 --decode 2 --schedulers 2` for under a
minute, with workers, the cache and a scheduler killed or frozen every few seconds and the transport corrupting
chunks. Nothing may be wrong, lost or leaked; RESULTS.md records a long run."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

CHAOS = Path(__file__).resolve().parents[2] / "bench" / "chaos.py"


@pytest.mark.soak
def test_a_short_chaos_soak_loses_nothing(model_dir, tmp_path):
    out = tmp_path / "chaos.json"
    run = subprocess.run([sys.executable, str(CHAOS), "--model", str(model_dir("llama")), "--duration-s", "45",
                          "--calm-s", "10", "--clients", "2", "--fault-every-s", "4", "--out", str(out)],
                         capture_output=True, text=True, timeout=600)
    assert out.exists(), run.stdout[-3000:] + run.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["num_faults"] >= 5, result
    assert result["completed"] > 0, result
    assert (result["wrong"], result["lost"], result["leaks"]) == (0, 0, []), result["examples"]
    assert result["launcher_exit"] == 0
    assert run.returncode == 0, run.stderr[-3000:]
