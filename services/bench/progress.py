"""Progress while a run goes on: a rich progress bar on a terminal, else a plain line on stderr every few seconds
(logs and CI stay readable, and nothing heavy is required)."""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time

from kvmesh.services.bench.metrics import RequestResult


class Progress:
    """Counts sends and finishes; `running()` shows them while the run lasts."""

    def __init__(self, total: int, interval_s: float = 5.0, label: str = "", enabled: bool = True):
        self.total, self.interval_s, self.label, self.enabled = total, interval_s, label, enabled
        self.num_sent = self.num_done = self.num_failed = 0
        self.start = time.perf_counter()
        self._bar = None

    def sent(self) -> None:
        """A request went out."""
        self.num_sent += 1
        if self._bar is not None:
            self._bar[0].update(self._bar[1], inflight=self.num_sent - self.num_done)

    def finished(self, result: RequestResult) -> None:
        """A request ended, well or not."""
        self.num_done += 1
        self.num_failed += 0 if result.ok else 1
        if self._bar is not None:
            self._bar[0].update(self._bar[1], completed=self.num_done, failed=self.num_failed,
                                inflight=self.num_sent - self.num_done)

    def line(self) -> str:
        """The plain progress line."""
        return (f"[kvmesh bench] {self.label}{self.num_done}/{self.total} done, {self.num_failed} failed, "
                f"{self.num_sent - self.num_done} in flight, {time.perf_counter() - self.start:.1f} s")

    @contextlib.asynccontextmanager
    async def running(self):
        """Show progress for the duration of the block."""
        self.start = time.perf_counter()
        if not self.enabled:
            yield
            return
        if sys.stderr.isatty() and self._start_bar():
            try:
                yield
            finally:
                self._bar[0].stop()
                self._bar = None
            return
        ticker = asyncio.create_task(self._tick())
        try:
            yield
        finally:
            ticker.cancel()
            print(self.line(), file=sys.stderr, flush=True)

    async def _tick(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            print(self.line(), file=sys.stderr, flush=True)

    def _start_bar(self) -> bool:
        try:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress as RichProgress, TextColumn, \
                TimeElapsedColumn
        except ImportError:
            return False
        bar = RichProgress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                           TextColumn("{task.fields[failed]} failed, {task.fields[inflight]} in flight"),
                           TimeElapsedColumn(), transient=False)
        task = bar.add_task(self.label or "requests", total=self.total, failed=0, inflight=0)
        bar.start()
        self._bar = (bar, task)
        return True
