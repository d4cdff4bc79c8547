"""The security gate: ruff's bandit rules for what turns network data into code — pickle and marshal, torch.load,
eval/exec, yaml.load, shell=True — and banned imports of the unpickling modules, over everything but the tests.
A finding fails CI with ruff's own explanation of the line."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
RULES = ("S102,S301,S302,S307,S506,S602,S604,S605,"  # exec, pickle, marshal, eval, yaml.load, shell=True
         "TID251")  # the banned APIs of pyproject.toml: torch.load, pickle, marshal, dill, shelve
CODE = ["services", "transports", "bench", "protos/generate.py", "deploy"]


def _ruff() -> list[str]:
    found = shutil.which("ruff", path=str(Path(sys.executable).parent)) or shutil.which("ruff")
    if found is None:
        pytest.skip("ruff is not installed (pip install -e '.[test]' installs it)")
    return [found]


def test_no_code_from_the_network():
    paths = [p for p in CODE if (ROOT / p).exists()]
    result = subprocess.run([*_ruff(), "check", "--no-cache", "--select", RULES, *paths], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_gate_catches_what_it_is_for(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("import pickle\nimport torch\n\n\ndef f(b):\n    torch.load(b)\n    return pickle.loads(b)\n")
    result = subprocess.run([*_ruff(), "check", "--no-cache", "--config", str(ROOT / "pyproject.toml"),
                             "--select", RULES, str(bad)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    for rule in ("S301", "TID251"):
        assert rule in result.stdout, result.stdout
    assert "torch.load" in result.stdout
