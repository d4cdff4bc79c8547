"""Failover with real processes: a decode worker killed (SIGKILL), frozen (SIGSTOP) or stopped (SIGTERM past its
grace period) under running streams has each of them continued on the other decode worker, with HF's greedy tokens, none lost or
repeated and the usage of the whole request; a prefill worker killed costs later requests latency, never an error.
Each test puts a fresh worker in place of the one it took away, and every block is free afterwards."""

import os
import signal
import threading
import time

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from transformers import AutoModelForCausalLM

from mesh import start_mesh
from reference import hf_greedy
from kvmesh.v1 import common_pb2, gateway_pb2, scheduler_pb2

LONG = 400  # tokens a stream asks for: many more than are generated between its first token and the fault
PROMPTS = [[(i * 31 + j * 7) % 900 + 3 for j in range(12 + i)] for i in range(8)]


@pytest.fixture(scope="module")
def mesh(model_dir):
    m = start_mesh(str(model_dir("llama")), prefill=2, decode=2)
    m.model = str(model_dir("llama"))
    yield m
    m.close()


@pytest.fixture(scope="module")
def hf(model_dir):
    return AutoModelForCausalLM.from_pretrained(model_dir("llama"))


def counter(mesh, name: str, **labels) -> float:
    text = httpx.get(f"http://127.0.0.1:{mesh.http_port}/metrics", timeout=10).text
    return sum(sample.value for family in text_string_to_metric_families(text) for sample in family.samples
               if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()))


class Stream(threading.Thread):
    """One greedy gRPC stream through the gateway, read on its own thread."""

    def __init__(self, mesh, prompt: list[int], max_tokens: int = LONG, **extra):
        super().__init__(daemon=True)
        sampling = common_pb2.SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, **extra)
        self.call = mesh.gateway_stub().Generate(
            gateway_pb2.GenerateRequest(prompt_token_ids=prompt, sampling=sampling), timeout=120)
        self.prompt, self.tokens, self.responses, self.error = prompt, [], [], None
        self.started = threading.Event()
        self.start()

    def run(self):
        try:
            for response in self.call:
                self.responses.append(response)
                self.tokens.extend(response.token_ids)
                self.started.set()
        except Exception as e:  # noqa: BLE001 — the test asserts there is none
            self.error = e
        self.started.set()


def replace(mesh, role: str, dead) -> None:
    """Start a fresh worker of role in dead's place and wait until the scheduler routes to exactly two again."""
    fresh = mesh.procs.start(role, "--scheduler", mesh.scheduler.address, "--model", mesh.model,
                             "--kv-cache-bytes", str(64 * 2**20), "--handoff-lease-s", "5", timeout_s=120)
    procs = mesh.decodes if role == "decode" else mesh.prefills
    procs[procs.index(dead)] = fresh
    wanted = {p.address for p in procs}
    enum = scheduler_pb2.WORKER_ROLE_DECODE if role == "decode" else scheduler_pb2.WORKER_ROLE_PREFILL
    deadline = time.monotonic() + 30
    while {w.address for w in mesh.workers(enum)} != wanted:
        assert time.monotonic() < deadline, f"the fresh {role} worker did not replace the dead one within 30 s"
        time.sleep(0.1)


def victim_with_streams(mesh, timeout_s: float = 60.0):
    """The decode worker with the most streams decoding now, once one has any: chosen while they run. (Waiting
    for every stream's first token before choosing assumed the early streams would still be running; on a loaded
    machine the last streams start so late that the first ones have finished, and the victim held nothing.)"""
    deadline = time.monotonic() + timeout_s
    while True:
        running = {p: mesh.worker_stats(p, "decode").num_running for p in mesh.decodes}
        victim = max(running, key=running.get)
        if running[victim] > 0:
            return victim
        assert time.monotonic() < deadline, "no decode worker ever had a stream decoding"
        time.sleep(0.02)


def assert_whole(stream, hf) -> None:
    assert stream.error is None, stream.error
    assert stream.tokens == hf_greedy(hf, stream.prompt, LONG)  # nothing lost, nothing repeated
    final = stream.responses[-1]
    assert final.finish_reason == common_pb2.FINISH_REASON_LENGTH
    assert (final.usage.prompt_tokens, final.usage.completion_tokens) == (len(stream.prompt), LONG)


def test_a_decode_worker_killed_mid_stream_has_every_stream_continue_elsewhere(mesh, hf):
    before = counter(mesh, "kvmesh:request_retries_total", stage="after_first_token")
    failures = counter(mesh, "kvmesh:request_failures_total")
    streams = [Stream(mesh, prompt) for prompt in PROMPTS]
    victim = victim_with_streams(mesh)
    os.kill(victim.proc.pid, signal.SIGSTOP)  # no stream on it can finish from here on
    os.kill(victim.proc.pid, signal.SIGKILL)
    victim.proc.wait(10)
    try:
        for stream in streams:
            stream.join(120)
            assert_whole(stream, hf)
        assert counter(mesh, "kvmesh:request_retries_total", stage="after_first_token") > before
        assert counter(mesh, "kvmesh:request_failures_total") == failures
    finally:
        replace(mesh, "decode", victim)  # the next tests get a whole mesh whatever happened here
    assert mesh.wait_blocks_free(15)


def test_a_frozen_decode_worker_is_told_from_a_slow_one_and_its_streams_move_on(mesh, hf):
    """SIGSTOP: the worker's connections stay open and nothing comes. The gateway's health check after a second of
    silence gets no answer, so the streams migrate; the frozen worker, thawed, frees what it held."""
    before = counter(mesh, "kvmesh:request_retries_total", stage="after_first_token")
    failures = counter(mesh, "kvmesh:request_failures_total")
    streams = [Stream(mesh, prompt) for prompt in PROMPTS]
    victim = victim_with_streams(mesh)
    os.kill(victim.proc.pid, signal.SIGSTOP)
    try:
        for stream in streams:
            stream.join(120)
            assert_whole(stream, hf)
    finally:
        os.kill(victim.proc.pid, signal.SIGCONT)
    # at least the stream seen decoding on it moved on (one may finish between the look and the SIGSTOP)
    assert counter(mesh, "kvmesh:request_retries_total", stage="after_first_token") > before
    assert counter(mesh, "kvmesh:request_failures_total") == failures
    assert victim.proc.poll() is None  # thawed, it serves on: its streams were cancelled, not its process
    assert mesh.wait_blocks_free(30)


def test_a_decode_worker_stopped_past_its_grace_period_hands_its_stream_on(mesh, hf):
    victim = mesh.decodes[0]
    fresh = mesh.procs.start("decode", "--scheduler", mesh.scheduler.address, "--model", mesh.model,
                             "--kv-cache-bytes", str(64 * 2**20), "--grace-s", "0.2", timeout_s=120)
    mesh.decodes[0] = fresh  # the one that will be stopped: a short grace period
    victim.proc.send_signal(signal.SIGTERM)
    assert victim.proc.wait(30) == 0
    deadline = time.monotonic() + 30
    while {w.address for w in mesh.workers(scheduler_pb2.WORKER_ROLE_DECODE)} != {p.address for p in mesh.decodes}:
        assert time.monotonic() < deadline, "the scheduler still routes to the stopped worker"
        time.sleep(0.1)
    before = counter(mesh, "kvmesh:request_retries_total", stage="after_first_token")
    streams = [Stream(mesh, prompt) for prompt in PROMPTS[:4]]
    for stream in streams:
        assert stream.started.wait(60) and stream.error is None, stream.error
    stopped = fresh if mesh.worker_stats(fresh, "decode").num_running else None
    if stopped is None:
        pytest.skip("every stream went to the other decode worker")  # the router spreads them; rare
    stopped.proc.send_signal(signal.SIGTERM)
    for stream in streams:
        stream.join(120)
        assert_whole(stream, hf)
    assert stopped.proc.wait(30) == 0
    assert counter(mesh, "kvmesh:request_retries_total", stage="after_first_token") > before
    replace(mesh, "decode", stopped)
    assert mesh.wait_blocks_free(15)


def test_a_prefill_worker_killed_costs_later_requests_no_error(mesh, hf):
    failures = counter(mesh, "kvmesh:request_failures_total")
    victim = mesh.prefills[0]
    os.kill(victim.proc.pid, signal.SIGKILL)
    victim.proc.wait(10)
    for prompt in PROMPTS:  # at once: the scheduler has not yet heard of the death, some go to the dead one
        got, _ = mesh.generate(prompt, max_tokens=8, ignore_eos=True)
        assert got == hf_greedy(hf, prompt, 8)
    assert counter(mesh, "kvmesh:request_failures_total") == failures
    replace(mesh, "prefill", victim)
    assert mesh.wait_blocks_free(15)


def test_a_migrated_structured_stream_resumes_its_grammar_where_it_was(mesh, model_dir):
    """The continuation's worker advances the constraint over the tokens already relayed: started afresh, it would
    ask for the opening "(" again. Greedy output equals an uninterrupted run of the engine in this process."""
    pytest.importorskip("xgrammar")
    from kvmesh.services.engine.engine import LLMEngine
    from kvmesh.services.engine.sampler import SamplingParams
    from kvmesh.services.engine.structured import Constraint

    pattern = r"\([a-z ]{4000}\)"  # cannot close within LONG tokens: every stream runs to max_tokens
    engine = LLMEngine.from_path(mesh.model, num_blocks=256)
    for i, prompt in enumerate(PROMPTS[:4]):
        engine.add_request(str(i), prompt, SamplingParams(temperature=0, max_tokens=LONG,
                                                          structured=Constraint("regex", pattern)))
    want: dict[str, list[int]] = {}
    while engine.has_unfinished():
        for out in engine.step():
            want.setdefault(out.request_id, []).extend(out.new_token_ids)
    before = counter(mesh, "kvmesh:request_retries_total", stage="after_first_token")
    streams = [Stream(mesh, prompt, structured_output=common_pb2.StructuredOutput(regex=pattern))
               for prompt in PROMPTS[:4]]
    victim = victim_with_streams(mesh)
    os.kill(victim.proc.pid, signal.SIGSTOP)
    os.kill(victim.proc.pid, signal.SIGKILL)
    victim.proc.wait(10)
    try:
        for i, stream in enumerate(streams):
            stream.join(120)
            assert stream.error is None, stream.error
            assert stream.tokens == want[str(i)] and len(stream.tokens) == LONG
            text = "".join(r.text for r in stream.responses)
            assert text.startswith("(") and text.count("(") == 1
        assert counter(mesh, "kvmesh:request_retries_total", stage="after_first_token") > before
    finally:
        replace(mesh, "decode", victim)
    assert mesh.wait_blocks_free(15)
