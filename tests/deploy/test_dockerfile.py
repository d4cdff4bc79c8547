"""deploy/Dockerfile (no image can be built here): its build args, install order and copied paths."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = (ROOT / "deploy" / "Dockerfile").read_text()


def _instructions() -> list[tuple[str, str]]:
    text = re.sub(r"\\\n\s*", " ", DOCKERFILE)
    return [tuple(line.split(None, 1)) for line in text.splitlines() if line.strip() and not line.startswith("#")]


def test_base_image_and_torch_install_are_build_args():
    steps = _instructions()
    assert steps[0] == ("ARG", "BASE_IMAGE=python:3.11-slim")
    assert steps[1] == ("FROM", "${BASE_IMAGE}")
    assert ("ARG", 'TORCH_INSTALL="pip install --no-cache-dir torch==2.13.0"') in steps


def test_torch_is_installed_before_the_project():
    runs = [arg for op, arg in _instructions() if op == "RUN"]
    torch_at = runs.index("${TORCH_INSTALL}")
    project_at = next(i for i, r in enumerate(runs) if r.startswith("pip install --no-cache-dir ."))
    assert torch_at < project_at


def test_every_copied_path_exists_in_the_repo():
    copies = [arg.split()[:-1] for op, arg in _instructions() if op == "COPY"]
    assert copies
    for sources in copies:
        for source in sources:
            assert (ROOT / source).exists(), source


def test_runs_as_an_unprivileged_user_with_kvmesh_as_entrypoint():
    steps = _instructions()
    assert ("USER", "kvmesh") in steps
    assert steps[-1] == ("CMD", '["--help"]') and ("ENTRYPOINT", '["kvmesh"]') in steps
