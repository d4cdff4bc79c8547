"""bench/gpu_smoke.sh: on a machine without an NVIDIA GPU it stops at once with status 2 and says why; it lints."""

import os
import shutil
import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[3] / "bench" / "gpu_smoke.sh"


def _run_with_path(folder: Path, tmp_path: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{folder}:/usr/bin:/bin", "KVMESH_GPU_VENV": str(tmp_path / "venv")}
    return subprocess.run(["bash", str(SCRIPT), str(tmp_path / "out")], capture_output=True, text=True,
                          env=env, timeout=60)


def test_without_nvidia_smi_it_exits_2_naming_what_is_missing(tmp_path):
    if shutil.which("nvidia-smi", path="/usr/bin:/bin"):
        pytest.skip("this machine has nvidia-smi: the check would run for real")
    result = _run_with_path(tmp_path / "empty", tmp_path)
    assert result.returncode == 2
    assert "nvidia-smi not found" in result.stderr and "NVIDIA GPU" in result.stderr
    assert not (tmp_path / "venv").exists()  # nothing installed


def test_an_nvidia_smi_that_lists_no_gpu_exits_2(tmp_path):
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "nvidia-smi").write_text("#!/bin/sh\necho 'NVIDIA-SMI has failed: no devices were found'\nexit 6\n")
    (fake / "nvidia-smi").chmod(0o755)
    result = _run_with_path(fake, tmp_path)
    assert result.returncode == 2
    assert "lists no GPU: NVIDIA-SMI has failed" in result.stderr
    assert not (tmp_path / "venv").exists()


def test_shellcheck_finds_nothing():
    if not shutil.which("shellcheck"):
        pytest.skip("shellcheck is not installed (apt-get install -y shellcheck)")
    result = subprocess.run(["shellcheck", str(SCRIPT)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout
