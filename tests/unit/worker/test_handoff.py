"""The handoff state machine: legal transitions, one cleanup per record on every path, leases that lapse only when
nothing moves, and late work for an ended record dropped quietly with its resources freed."""

import asyncio
import logging

import grpc
import pytest

from kvmesh.services.common import errors, metrics
from kvmesh.services.worker.handoff import HandoffEnded, HandoffState, HandoffTable


def run(coro):
    return asyncio.run(coro)


def test_release_runs_cleanups_once_in_reverse_order():
    async def main():
        table, calls = HandoffTable(lease_s=5), []
        table.open("r1")
        table.on_release("r1", lambda: calls.append("free blocks"))

        async def cancel_transfer():
            calls.append("cancel transfer")

        table.on_release("r1", cancel_transfer)
        assert await table.end("r1") is True
        assert await table.end("r1") is False  # idempotent
        return calls, len(table)

    calls, live = run(main())
    assert calls == ["cancel transfer", "free blocks"]
    assert live == 0


def test_illegal_transition_is_refused():
    table = HandoffTable(lease_s=5)
    table.open("r1")
    table.advance("r1", HandoffState.WRITING)
    with pytest.raises(ValueError, match="writing → decoding"):
        table.advance("r1", HandoffState.DECODING)


def test_lapsed_lease_expires_the_record_and_frees():
    async def main():
        table, freed = HandoffTable(lease_s=0.2, sweep_s=0.02), []
        table.start()
        table.open("r1")
        table.on_release("r1", lambda: freed.append("r1"))
        await asyncio.sleep(0.5)
        await table.close()
        return freed, table.num_expired

    freed, expired = run(main())
    assert freed == ["r1"] and expired == 1


def test_progress_renews_the_lease():
    async def main():
        table = HandoffTable(lease_s=0.3, sweep_s=0.02)
        table.start()
        table.open("r1")
        for state in (HandoffState.WRITING, HandoffState.READY, HandoffState.DECODING):
            await asyncio.sleep(0.2)
            table.advance("r1", state)
        await asyncio.sleep(0.2)
        alive = table.get("r1") is not None
        await table.close()
        return alive

    assert run(main()) is True


def test_a_failing_cleanup_does_not_stop_the_others():
    async def main():
        table, calls = HandoffTable(lease_s=5), []
        table.open("r1")
        table.on_release("r1", lambda: calls.append("ran"))
        table.on_release("r1", lambda: 1 / 0)
        await table.end("r1", HandoffState.FAILED, "boom")
        return calls

    assert run(main()) == ["ran"]


def test_a_handoff_renewed_by_transfer_progress_outlives_its_lease_and_lapses_once_it_stops():
    async def main():
        table = HandoffTable(lease_s=0.3, sweep_s=0.02)
        table.start()
        table.open("r1")
        table.advance("r1", HandoffState.WRITING)
        for _ in range(10):  # 1 s of layers arriving every 0.1 s: three lease periods, never one without progress
            await asyncio.sleep(0.1)
            table.renew("r1")
        alive = table.get("r1") is not None
        await asyncio.sleep(1.0)  # nothing moves for over a lease period
        gone, expired = table.get("r1") is None, table.num_expired
        await table.close()
        return alive, gone, expired

    assert run(main()) == (True, True, 1)


def test_an_idle_handoff_in_writing_still_expires():
    async def main():
        table, freed = HandoffTable(lease_s=0.2, sweep_s=0.02), []
        table.start()
        table.open("r1")
        table.on_release("r1", lambda: freed.append("blocks"))
        table.advance("r1", HandoffState.WRITING)
        await asyncio.sleep(0.6)
        await table.close()
        return freed, table.num_expired

    assert run(main()) == (["blocks"], 1)


def _late_count() -> float:
    return metrics.REGISTRY.get_sample_value("kvmesh:handoff_late_total", {"cause": "expired"}) or 0.0


class _Context:
    """The part of a grpc.aio ServicerContext that abort_with uses."""

    code = None

    async def abort(self, code, details, trailing_metadata=()):
        self.code, self.details, self.trailing_metadata = code, details, trailing_metadata


def test_a_late_ready_after_expiry_is_dropped_quietly_with_deadline_exceeded(caplog):
    async def main():
        table, freed = HandoffTable(lease_s=0.1, sweep_s=0.02), []
        table.start()
        table.open("r1")
        table.on_release("r1", lambda: freed.append("blocks"))
        table.advance("r1", HandoffState.WRITING)
        await asyncio.sleep(0.4)  # expired while the KV was on its way
        with pytest.raises(HandoffEnded) as info:  # the KV lands now: the decode worker moves it to READY
            table.advance("r1", HandoffState.READY)
        context = _Context()
        with caplog.at_level(logging.DEBUG):
            await errors.abort_with(context, info.value)  # what the server skeleton does with it
        await table.close()
        return freed, table.num_late, context

    before = _late_count()
    freed, num_late, context = run(main())
    assert freed == ["blocks"] and num_late == 1
    assert context.code == grpc.StatusCode.DEADLINE_EXCEEDED and "expired" in context.details
    assert _late_count() == before + 1
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING and "expired in state" not in r.message]
    assert not [r for r in caplog.records if r.exc_info]  # no traceback


def test_a_resource_taken_after_the_handoff_ended_is_freed_at_once():
    async def main():
        table, freed = HandoffTable(lease_s=5), []
        table.open("r1")
        await table.end("r1", HandoffState.FAILED, "aborted")

        async def free_blocks():
            freed.append("blocks")

        with pytest.raises(HandoffEnded) as info:
            table.on_release("r1", free_blocks)  # e.g. blocks reserved while the abort ran
        await table.close()  # waits for the late cleanup
        return freed, errors.status_for(info.value)

    assert run(main()) == (["blocks"], grpc.StatusCode.UNAVAILABLE)
