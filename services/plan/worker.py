"""One simulated engine worker: the step loop of services/engine/scheduler.py priced by the fitted cost models.

Each step first serves the running decodes (one token each), then prompt chunks, oldest first, within the token
budget (max_num_batched_tokens), max_num_seqs and pack_prompt_tokens — the real engine's order. A prefill worker
only chunks prompts and hands each finished one off; a decode worker only decodes sequences whose KV has landed,
which join its batch at the next step whatever max_num_seqs (as `LLMEngine.add_prefilled` does; a batch over the
token budget, where the engine would skip some decodes for a step, is not modelled); a colocated worker does both
in one step. A decode step is O(1) in the batch: the batch's total context grows by the batch size per step, and
a sequence's finishing step is known when it joins (a heap), so no Python loop runs per token.
"""

from __future__ import annotations

import heapq
from collections import deque
from dataclasses import dataclass

from kvmesh.services.plan.costs import Profile
from kvmesh.services.scheduler.registry import Load, Worker


@dataclass(frozen=True)
class RoleLimits:
    """A worker role's engine limits (the worker's --max-num-seqs, --max-num-batched-tokens and
    --pack-prompt-tokens)."""

    max_num_seqs: int
    max_num_batched_tokens: int
    pack_prompt_tokens: int = 0


class Job:
    """One request's way through the simulated mesh (mutable; plain slots, since 10,000s are made)."""

    __slots__ = ("index", "arrival_s", "input_length", "output_length", "hash_ids", "num_cached", "num_done",
                 "decode", "first_token_s", "finish_s", "join_step", "rejected")

    def __init__(self, index: int, arrival_s: float, input_length: int, output_length: int, hash_ids=()):
        self.index, self.arrival_s = index, arrival_s
        self.input_length, self.output_length, self.hash_ids = input_length, output_length, hash_ids
        self.num_cached = 0  # leading prompt tokens the cache held: not computed
        self.num_done = 0  # prompt tokens computed so far (chunked prefill)
        self.decode: SimWorker | None = None  # where it decodes (disaggregated: set by the route)
        self.first_token_s = self.finish_s = -1.0
        self.join_step = 0
        self.rejected = False

    @property
    def num_to_compute(self) -> int:
        """Prompt tokens the prefill must compute."""
        return self.input_length - self.num_cached


class SimWorker:
    """A simulated prefill, decode or colocated worker, registered in the router's eyes as `worker`."""

    def __init__(self, worker: Worker, profile: Profile, limits: RoleLimits, prefills: bool, decodes: bool):
        self.worker, self.profile, self.limits = worker, profile, limits
        self.prefills, self.decodes = prefills, decodes
        self.busy = False
        self.waking = False  # a wake-up is scheduled for this instant
        self.waiting: deque[Job] = deque()  # prompts to compute (prefill, colocated) or landed KV (decode)
        self.local: deque[Job] = deque()  # decode: prompts the route told it to prefill itself (local_prefill)
        self.prefilling: list[Job] = []  # admitted prompts partly computed
        self.num_running = 0
        self.num_pending = 0  # decode: routed here, KV not landed yet (the decode worker owns them already)
        self.num_steps = 0
        self.context_tokens = 0  # every running sequence's length, summed
        self._finishes: list[tuple[int, int, Job]] = []  # (finishing step, index, job)
        self._chunks: list[tuple[Job, int]] = []  # the step now running's prompt chunks

    def load(self) -> Load:
        """The load this worker's next heartbeat reports."""
        queue = self.waiting if self.prefills else self.local
        pending = [j.num_to_compute - j.num_done for j in (*queue, *self.prefilling)]
        return Load(num_waiting=len(self.waiting) + len(self.local) + self.num_pending,
                    num_running=self.num_running + len(self.prefilling),
                    num_pending_prefill_tokens=sum(pending), num_pending_prefill=len(pending))

    def join(self, job: Job) -> None:
        """Start decoding job (its first token exists; output_length - 1 decode steps follow)."""
        job.join_step = self.num_steps
        self.num_running += 1
        self.context_tokens += job.input_length + 1
        heapq.heappush(self._finishes, (self.num_steps + job.output_length - 1, job.index, job))

    def start_step(self) -> float | None:
        """Schedule the next step; its duration in seconds, or None when there is nothing to do."""
        limits = self.limits
        if self.decodes and not self.prefills:
            # landed KV joins the running batch at once, whatever max_num_seqs (the engine's add_prefilled)
            while self.waiting:
                self.join(self.waiting.popleft())
        batch = self.num_running
        seconds = self.profile.decode.seconds(batch, self.context_tokens) if batch else 0.0
        budget = limits.max_num_batched_tokens - batch
        self._chunks = chunks = []
        if (self.prefills or self.local or self.prefilling) and budget > 0:
            seconds += self._plan_chunks(budget, limits.max_num_seqs - batch, not batch)
        if not batch and not chunks:
            return None
        self.busy = True
        return seconds

    def _plan_chunks(self, budget: int, seats: int, alone: bool) -> float:
        """Prompt chunks for this step, the running prompts first; their seconds. A step that also decodes pays
        the larger of the two intercepts, not both: one forward pass carries both kinds of token."""
        model = self.profile.prefill
        seconds = 0.0
        for job in self.prefilling:
            if budget <= 0:
                break
            seconds += self._chunk(job, budget)
            budget -= self._chunks[-1][1]
        queue = self.waiting if self.prefills else self.local
        pack = self.limits.pack_prompt_tokens
        while queue and budget > 0 and len(self.prefilling) < seats:
            if pack and sum(k for _, k in self._chunks) >= pack:
                break
            job = queue.popleft()
            self.prefilling.append(job)
            seconds += self._chunk(job, budget)
            budget -= self._chunks[-1][1]
        if not self._chunks:
            return 0.0
        intercept = model.a if alone else max(0.0, model.a - self.profile.decode.a)
        return seconds + intercept

    def _chunk(self, job: Job, budget: int) -> float:
        """Take job's next chunk (at most budget tokens) into this step; its seconds, without the intercept."""
        k = min(budget, job.num_to_compute - job.num_done)
        self._chunks.append((job, k))
        # the chunk's tokens attend over every token before them, cached ones included
        return self.profile.prefill.chunk_cost(job.num_cached + job.num_done, k)

    def finish_step(self) -> tuple[list[Job], list[Job]]:
        """End the running step: (jobs whose prompt is now computed, jobs that produced their last token)."""
        self.busy = False
        prefilled = []
        for job, k in self._chunks:
            job.num_done += k
            if job.num_done >= job.num_to_compute:
                prefilled.append(job)
        if prefilled:
            done = set(map(id, prefilled))
            self.prefilling = [j for j in self.prefilling if id(j) not in done]
        self._chunks = []
        finished = []
        if self.num_running:
            self.num_steps += 1
            self.context_tokens += self.num_running
            while self._finishes and self._finishes[0][0] <= self.num_steps:
                _, _, job = heapq.heappop(self._finishes)
                self.num_running -= 1
                self.context_tokens -= job.input_length + 1 + self.num_steps - job.join_step
                finished.append(job)
        return prefilled, finished
