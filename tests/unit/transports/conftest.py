"""Unit tests of kvmesh.transports: no shm segment of this process may outlive the module."""

import os

import pytest

from kvmesh.transports.shm import list_segments


@pytest.fixture(scope="module", autouse=True)
def no_leaked_segments():
    yield
    mine = [n for n in list_segments() if n.startswith(f"kvmesh-{os.getpid()}-")]
    assert not mine, f"leaked shm segments: {mine}"
