"""A streaming request that the mesh refuses before its first token gets the refusal as its HTTP status (and a JSON
error body), not a 200 followed by an SSE error event: the gateway waits for every choice's first message before
the status line goes out."""

import os
import signal
import time

import httpx
import pytest

from mesh import start_mesh
from kvmesh.v1 import scheduler_pb2


@pytest.fixture(scope="module")
def mesh(model_dir):
    m = start_mesh(str(model_dir("llama")), prefill=1, decode=1, lease_s=2.0)
    yield m
    m.close()


def test_a_stream_with_no_decode_worker_gets_503_not_200(mesh):
    body = {"prompt": "Once upon a time", "max_tokens": 4, "stream": True}
    ok = httpx.post(f"{mesh.http_base}/completions", json=body, timeout=60)
    assert ok.status_code == 200 and ok.text.rstrip().endswith("data: [DONE]")
    dead = mesh.decodes[0]
    os.kill(dead.proc.pid, signal.SIGKILL)
    dead.proc.wait(10)
    deadline = time.monotonic() + 30
    while mesh.workers(scheduler_pb2.WORKER_ROLE_DECODE) and time.monotonic() < deadline:
        time.sleep(0.1)  # its lease lapses: the scheduler has no decode worker to route to
    assert not mesh.workers(scheduler_pb2.WORKER_ROLE_DECODE)
    for path, payload in (("/completions", body),
                          ("/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "stream": True})):
        refused = httpx.post(f"{mesh.http_base}{path}", json=payload, timeout=60)
        assert refused.status_code == 503, refused.text
        assert refused.headers["content-type"].startswith("application/json")
        assert "decode" in refused.json()["error"]["message"]
