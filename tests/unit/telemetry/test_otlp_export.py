"""The real OTLP path: spans from telemetry.setup() reach a real OTLP collector (rotel) over gRPC and HTTP."""

import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

rotel = pytest.importorskip("rotel", reason="rotel (an OTLP collector on PyPI, in the `test` extra) is not installed")
AGENT = Path(rotel.__file__).with_name("rotel-agent")

EMIT = """
from kvmesh.services.common import telemetry
telemetry.setup("gateway", "gateway", "gw-7")
with telemetry.tracer().start_as_current_span("gateway.Generate") as span:
    span.set_attribute("kvmesh.request_id", "otlp-req")
telemetry.shutdown()
"""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_port(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise AssertionError(f"collector did not listen on {port}")


@pytest.mark.parametrize("protocol", ["grpc", "http/protobuf"])
def test_spans_reach_an_otlp_collector(tmp_path, protocol):
    grpc_port, http_port = _free_port(), _free_port()
    log = tmp_path / "collector.log"
    with open(log, "wb") as out:
        agent = subprocess.Popen([str(AGENT), "start", "--otlp-grpc-endpoint", f"127.0.0.1:{grpc_port}",
                                  "--otlp-http-endpoint", f"127.0.0.1:{http_port}", "--exporter", "blackhole",
                                  "--debug-log", "traces", "--debug-log-verbosity", "detailed",
                                  "--log-file", str(tmp_path / "agent.log")], stdout=out, stderr=subprocess.STDOUT)
    try:
        port = grpc_port if protocol == "grpc" else http_port
        _wait_port(port)
        env = {**os.environ, "OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_PROTOCOL": protocol,
               "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{port}"}
        subprocess.run([sys.executable, "-c", EMIT], env=env, check=True, timeout=30)
        deadline = time.monotonic() + 10
        while "otlp-req" not in log.read_text(errors="replace") and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        agent.terminate()
        agent.wait(10)
    text = re.sub(r"\x1b\[[0-9;]*m", "", log.read_text(errors="replace"))
    assert "Name           : gateway.Generate" in text
    assert "kvmesh.request_id: Str(otlp-req)" in text
    assert "service.name: Str(kvmesh-gateway)" in text and "service.instance.id: Str(gw-7)" in text
