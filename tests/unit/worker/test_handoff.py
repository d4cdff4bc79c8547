"""The handoff state machine: legal transitions, one cleanup per record on every path, lease expiry."""

import asyncio

import pytest

from kvmesh.services.worker.handoff import HandoffState, HandoffTable


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
