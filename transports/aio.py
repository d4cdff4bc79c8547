"""Helpers shared by the generic sending and receiving code: deadlines, first failure, typed errors, reporting."""

from __future__ import annotations

import asyncio
import contextvars
import logging
from typing import Callable

import kvmesh.transports.errors as errors
from kvmesh.transports.base import Observer, TransferStats

log = logging.getLogger(__name__)


async def first_failure(*aws) -> list:
    """Await all; on the first failure cancel the rest and raise it (asyncio.gather would leave them running)."""
    tasks = [asyncio.ensure_future(a) for a in aws]
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        failures = [task.exception() for task in done if task.exception() is not None]  # all retrieved
        if failures:
            raise failures[0]
        return [t.result() for t in tasks]
    finally:
        for task in tasks:
            if not task.done():
                task.cancel()


async def within(make: Callable[[], object], seconds: float):
    """Await `make()` for at most `seconds` (asyncio's TimeoutError when it takes longer)."""
    if hasattr(asyncio, "timeout"):  # 3.11+: no extra task per await
        async with asyncio.timeout(seconds):
            return await make()
    return await asyncio.wait_for(make(), seconds)  # pragma: no cover - python 3.10


def typed(exc: BaseException, where: str) -> errors.TransportError:
    """The TransportError that stands for `exc` (itself, when it is one already)."""
    if isinstance(exc, errors.TransportError):
        return exc
    if isinstance(exc, (asyncio.TimeoutError, TimeoutError)):
        return errors.TransferTimeout(f"{where}: deadline passed")
    if isinstance(exc, asyncio.CancelledError):
        return errors.TransferAborted(f"{where}: cancelled")
    if isinstance(exc, (ConnectionError, OSError)):
        return errors.PeerUnavailable(f"{where}: {exc}")
    return errors.TransportError(f"{where}: {type(exc).__name__}: {exc}")


def notify(observer: Observer | None, stats: TransferStats, context: contextvars.Context | None = None) -> None:
    """Hand a transfer's stats to its observer (in `context`, default the current one); never raises: reporting
    must not fail a transfer."""
    if observer is None:
        return
    try:
        if context is None:
            observer(stats)
        else:
            context.run(observer, stats)
    except Exception:  # noqa: BLE001
        log.exception("transfer %s: its observer failed", stats.transfer_id)


def retrieved(task: asyncio.Future) -> None:
    """A done-callback that marks a future's exception as retrieved (whoever needs it reads it later)."""
    if not task.cancelled():
        task.exception()
