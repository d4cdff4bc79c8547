"""One benchmark run: send sessions on a schedule fixed up front, collect every request's result, summarize.

The dispatcher only sleeps until the next send time and creates a task, so one process keeps thousands of
streams in flight; `max_concurrency` caps the requests in flight (a request waits for a slot, and its TTFT
counts from when it was sent, as `vllm bench serve` does), and a session's turns run one after another.
"""

from __future__ import annotations

import asyncio
import math
import sys
import time
from dataclasses import dataclass

from kvmesh.services.bench import arrivals
from kvmesh.services.bench.client import BenchClient
from kvmesh.services.bench.datasets import Session
from kvmesh.services.bench.metrics import RequestResult, Slo, summarize
from kvmesh.services.bench.progress import Progress

YIELD_EVERY = 64  # a burst behind schedule still lets the sends already made go out


@dataclass(frozen=True)
class LoadShape:
    """How requests arrive: a rate (None: a trace's own timestamps, else all at once), gamma `burstiness` (1.0 is
    Poisson), or evenly spaced (`constant`); `time_scale` stretches a trace's timestamps."""

    request_rate: float | None = None
    burstiness: float = 1.0
    constant: bool = False
    time_scale: float = 1.0
    max_concurrency: int | None = None
    seed: int = 0

    def offsets(self, sessions: list[Session]) -> list[float]:
        """Each session's send time, in seconds from the start."""
        stamps = [s.timestamp_ms for s in sessions]
        if self.request_rate is None and stamps and all(t is not None for t in stamps):
            return arrivals.from_timestamps(stamps, self.time_scale)
        rate = math.inf if self.request_rate is None else self.request_rate
        return arrivals.offsets(len(sessions), rate, self.burstiness, self.seed,
                                "constant" if self.constant else "gamma")


@dataclass
class RunOutcome:
    """Every request's result, the run's wall time, and its summary."""

    results: list[RequestResult]
    duration_s: float
    summary: dict


class _Run:
    """The state of one run, shared by its session tasks."""

    def __init__(self, client: BenchClient, shape: LoadShape, progress: Progress):
        self.client, self.progress = client, progress
        self.slots = asyncio.Semaphore(shape.max_concurrency) if shape.max_concurrency else None
        self.results: list[RequestResult] = []
        self.start = time.perf_counter()
        self.last_end = self.start

    async def _send(self, turn, result: RequestResult) -> None:
        result.start_s = time.perf_counter() - self.start
        self.progress.sent()
        await self.client.send(turn, result)
        self.last_end = max(self.last_end, time.perf_counter())
        self.progress.finished(result)

    async def session(self, session: Session, due_s: float) -> None:
        """Its turns in order, each after the previous one has finished."""
        for turn in session.turns:
            result = RequestResult(turn.session, turn.turn, len(turn.prompt_ids), turn.output_len,
                                   scheduled_s=due_s if turn.turn == 0 else time.perf_counter() - self.start)
            self.results.append(result)
            if self.slots is None:
                await self._send(turn, result)
            else:
                async with self.slots:
                    await self._send(turn, result)


async def run_load(sessions: list[Session], client: BenchClient, shape: LoadShape, slo: Slo = Slo(),
                   progress: Progress | None = None) -> RunOutcome:
    """Send `sessions` on `shape`'s schedule through `client`; return once every request has ended."""
    due = shape.offsets(sessions)
    progress = progress or Progress(sum(len(s.turns) for s in sessions))
    run = _Run(client, shape, progress)
    tasks = []
    async with progress.running():
        for i, (session, at) in enumerate(zip(sessions, due)):
            delay = at - (time.perf_counter() - run.start)
            if delay > 0:
                await asyncio.sleep(delay)
            elif i % YIELD_EVERY == 0:
                await asyncio.sleep(0)
            tasks.append(asyncio.create_task(run.session(session, at)))
        await asyncio.gather(*tasks)
    duration = run.last_end - run.start
    return RunOutcome(run.results, duration, summarize(run.results, duration, slo))


def event_loop_runner():
    """`uvloop.run` where uvloop is installed (it is a dependency on every platform we serve from), else asyncio."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover
        return asyncio.run
    return uvloop.run


def note(message: str) -> None:
    """A line for the operator on stderr (stdout carries the summary)."""
    print(f"[kvmesh bench] {message}", file=sys.stderr, flush=True)
