"""End-to-end fixtures: real service processes on 127.0.0.1."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from procs import Procs  # noqa: E402


@pytest.fixture
def procs():
    """Start `kvmesh <service>` processes (procs.start("scheduler", ...)); any still running is killed after."""
    started = Procs()
    try:
        yield started
    finally:
        started.kill_all()
