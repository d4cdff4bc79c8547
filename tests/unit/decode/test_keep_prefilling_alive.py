"""A request the decode worker prefills itself waits in its engine behind other prompts: while the engine steps,
the worker renews that request's handoff (and only while it still waits for its first output), as a prefill
worker does for its queue; a dead engine thread renews nothing."""

import asyncio
from types import SimpleNamespace

import pytest

from kvmesh.services.decode import worker as decode_worker
from kvmesh.services.decode.worker import DecodeWorker


def run_ticks(worker, monkeypatch, ticks: int) -> list[str]:
    renewed, slept = [], []

    async def sleep(_seconds):
        if len(slept) == ticks:
            raise asyncio.CancelledError
        slept.append(_seconds)

    monkeypatch.setattr(decode_worker.asyncio, "sleep", sleep)
    worker.handoffs.renew = renewed.append
    with pytest.raises(asyncio.CancelledError):
        asyncio.run(worker.keep_prefilling_alive())
    assert slept and all(s == worker.handoffs.lease_s / 3 for s in slept)
    return renewed


def make(alive=True) -> DecodeWorker:
    thread = SimpleNamespace(alive=alive, engine=SimpleNamespace(tokenizer=None))
    worker = DecodeWorker(thread, None, None, lease_s=3.0)
    worker.prefilling.update({"waiting-1", "waiting-2"})
    return worker


def test_requests_prefilled_here_are_renewed_while_the_engine_steps(monkeypatch):
    assert sorted(run_ticks(make(), monkeypatch, 2)) == ["waiting-1", "waiting-1", "waiting-2", "waiting-2"]


def test_a_dead_engine_thread_renews_nothing(monkeypatch):
    assert run_ticks(make(alive=False), monkeypatch, 3) == []
