"""Running an `LLMEngine` off the event loop: one dedicated thread steps it, the loop talks to it by messages.

The event loop never computes (torch releases the GIL inside its kernels, so a forward pass in this thread
leaves heartbeats, token streams, KV transfers and cancellations flowing). The loop sends commands with
`call()` — they run in the engine thread between two steps, so the engine needs no locks — and receives each
request's outputs on its own asyncio queue. The thread sleeps when the engine has nothing to do.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from kvmesh.services.cost_model import step_shape

log = logging.getLogger(__name__)
_STOP = object()
STEP_SAMPLES = 64


class EngineThread:
    """Owns an engine and the thread that steps it."""

    def __init__(self, engine, loop: asyncio.AbstractEventLoop, name: str = "engine"):
        self.engine = engine
        self._loop = loop
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._outputs: dict[str, asyncio.Queue] = {}
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self.last_step_s = 0.0
        #: `time.time_ns()` when the current (or last) step began; read from the engine thread's own callbacks.
        self.step_started_ns = 0
        self.num_steps = 0
        #: (StepShape, seconds) of recent steps, drained by heartbeats for the scheduler's cost models
        self.step_samples: deque = deque(maxlen=STEP_SAMPLES)
        #: prompt tokens in the engine not yet computed, as of the last step (read from the loop: one int)
        self.num_pending_prefill_tokens = 0
        self.num_pending_prefill = 0  # ... and the requests they belong to

    def start(self) -> None:
        """Start stepping the engine (from the event loop whose queues it feeds)."""
        self._thread.start()

    @property
    def alive(self) -> bool:
        """The stepping thread runs (a step in progress counts, however long: a slow machine is not a dead one)."""
        return self._thread.is_alive()

    def stop(self, timeout_s: float = 10.0) -> None:
        """Ask the thread to finish its current step and exit."""
        self._commands.put(_STOP)
        self._thread.join(timeout_s)

    async def call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Run fn(*args) in the engine thread between steps; return its result (or raise its error) here."""
        return await self.submit(fn, *args, **kwargs)

    def submit(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> asyncio.Future:
        """Queue fn(*args) for the engine thread now (commands run in the order queued); await the future later."""
        future = self._loop.create_future()
        self._commands.put((fn, args, kwargs, future))
        return future

    def post(self, fn: Callable[..., Any], *args: Any) -> None:
        """Queue fn(*args) for the engine thread without waiting for it: for work whose caller must not wait out
        the step in progress (freeing a finished prefill's blocks before answering). An error it raises is logged."""
        self.submit(fn, *args).add_done_callback(_log_failure)

    def subscribe(self, request_id: str) -> asyncio.Queue:
        """The queue on which this request's RequestOutputs will arrive (call before adding the request)."""
        q = self._outputs[request_id] = asyncio.Queue()
        return q

    def unsubscribe(self, request_id: str) -> None:
        """Stop delivering this request's outputs (its queue is dropped)."""
        self._outputs.pop(request_id, None)

    def _settle(self, future: asyncio.Future, result: Any, error: BaseException | None) -> None:
        if future.cancelled():
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)

    def _run_command(self, item) -> bool:
        if item is _STOP:
            return False
        fn, args, kwargs, future = item
        try:
            result, error = fn(*args, **kwargs), None
        except BaseException as e:  # handed to the awaiting coroutine
            result, error = None, e
        self._loop.call_soon_threadsafe(self._settle, future, result, error)
        return True

    def _deliver(self, outputs: list) -> None:
        for out in outputs:
            q = self._outputs.get(out.request_id)
            if q is not None:
                q.put_nowait(out)

    def _sample_step(self) -> None:
        chunks = getattr(self.engine, "step_chunks", None)
        if chunks:
            self.step_samples.append((step_shape(chunks.values()), self.last_step_s))
        scheduler = getattr(self.engine, "scheduler", None)
        if scheduler is None:  # a stand-in engine (tests)
            return
        pending = [s.num_prompt_tokens - s.num_computed_tokens for s in [*scheduler.waiting, *scheduler.running]
                   if s.num_computed_tokens < s.num_prompt_tokens]
        self.num_pending_prefill, self.num_pending_prefill_tokens = len(pending), sum(pending)

    def drain_step_samples(self) -> list:
        """The step samples recorded since the last drain (from the event loop)."""
        out = []
        while self.step_samples:
            out.append(self.step_samples.popleft())
        return out

    def _run(self) -> None:
        while True:
            busy = self.engine.has_unfinished()
            try:
                item = self._commands.get(block=not busy, timeout=None if not busy else 0)
            except queue.Empty:
                item = None
            if item is not None:
                if not self._run_command(item):
                    return
                while True:  # drain every pending command before the next step
                    try:
                        item = self._commands.get_nowait()
                    except queue.Empty:
                        break
                    if not self._run_command(item):
                        return
                continue
            start = time.perf_counter()
            self.step_started_ns = time.time_ns()
            self.engine.step_chunks = {}
            outputs = self.engine.step()
            self.last_step_s = time.perf_counter() - start
            self.num_steps += 1
            self._sample_step()
            if outputs:
                self._loop.call_soon_threadsafe(self._deliver, outputs)


def _log_failure(future: asyncio.Future) -> None:
    if not future.cancelled() and future.exception() is not None:
        log.error("engine command failed", exc_info=future.exception())
