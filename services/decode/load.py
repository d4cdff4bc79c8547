"""What the decode worker tells the schedulers about its load beyond the counts: the KV blocks its requests will
take (admission counts them against the pool), the requests that reached it (so a scheduler keeps counting only
the routes still on their way), and each finish at once — the last message of a request goes out only after every
scheduler has seen that its blocks and queue place are free again (or a bounded wait passed), so a client that
sends its next request on seeing the end of the last is never refused for load that is gone."""

from __future__ import annotations

from kvmesh.services.common import metrics
from kvmesh.services.common.registration import heartbeat_everywhere
from kvmesh.services.worker.handoff import HandoffState
from kvmesh.v1 import decode_pb2, scheduler_pb2

#: Longest wait of a request's last message for the schedulers to see it finished (a slow one is not waited out).
SEEN_TIMEOUT_S = 1.0
#: Finished requests the mean output length follows (an exponential average over about this many).
OUTPUT_WINDOW = 64


def expected_remaining(max_tokens: int, generated: int, mean_output: float) -> int:
    """Tokens a request is still expected to generate: its expected length (max_tokens, capped by the mean output
    length once one is known) less what it generated, at least 1 while it runs."""
    expected = min(max_tokens, round(mean_output)) if mean_output else max_tokens
    return max(expected - generated, 1)


class Claims:
    """The KV blocks each request here will hold at most (prompt + max_tokens), from its arrival to its end, and
    how many tokens each is still expected to generate (length-aware placement at the schedulers)."""

    def __init__(self) -> None:
        self._blocks: dict[str, int] = {}
        self._lengths: dict[str, list[int]] = {}  # request id -> [max_tokens, tokens generated]
        self.mean_output_tokens = 0.0  # WorkerLoad.mean_output_tokens: over recently finished requests
        self._num_finished = 0
        self.registrations: list = []  # RegistrationClient per scheduler (set once registered)

    @property
    def num_remaining_tokens(self) -> int:
        """Tokens the requests here are still expected to generate (WorkerLoad.num_remaining_tokens)."""
        return sum(expected_remaining(m, g, self.mean_output_tokens) for m, g in self._lengths.values())

    def generated(self, request_id: str, num_tokens: int) -> None:
        """A request generated num_tokens more."""
        entry = self._lengths.get(request_id)
        if entry is not None:
            entry[1] += num_tokens

    @property
    def num_blocks(self) -> int:
        """Blocks claimed by every request here (WorkerLoad.num_blocks_claimed)."""
        return sum(self._blocks.values())

    def arrived(self, request_id: str, num_blocks: int, max_tokens: int = 0) -> None:
        """A routed request reached this worker: claim its blocks, and tell each scheduler's next heartbeat."""
        self._blocks[request_id] = num_blocks
        self._lengths[request_id] = [max_tokens, 0]
        for registration in self.registrations:
            registration.note_arrival(request_id)

    async def finished(self, request_id: str) -> None:
        """A request produced its last token: fold its output length into the mean, drop its claim and heartbeat
        every scheduler now (bounded wait)."""
        self._blocks.pop(request_id, None)
        entry = self._lengths.pop(request_id, None)
        if entry is not None:
            self._num_finished += 1
            self.mean_output_tokens += (entry[1] - self.mean_output_tokens) / min(self._num_finished, OUTPUT_WINDOW)
        await heartbeat_everywhere(self.registrations, SEEN_TIMEOUT_S)

    def ended(self, request_id: str) -> None:
        """A request ended, however: drop its claim (idempotent)."""
        self._blocks.pop(request_id, None)
        self._lengths.pop(request_id, None)


def worker_stats(worker) -> decode_pb2.WorkerStats:
    """A decode worker's Stats reply: its load, handoffs, transfers and prefix cache."""
    load = worker.load()
    cache = worker.engine.prefix_cache_stats()
    return decode_pb2.WorkerStats(num_waiting=load.num_waiting, num_running=load.num_running,
                                  num_free_blocks=load.num_free_blocks, num_total_blocks=load.num_total_blocks,
                                  num_handoffs=len(worker.handoffs), num_transfers=worker.receiver.num_transfers,
                                  num_cached_blocks=cache["cached_blocks"],
                                  num_cached_free_blocks=cache["cached_free_blocks"],
                                  prefix_hit_blocks=cache["hit_blocks"], prefix_evictions=cache["evictions"])


def worker_load(worker) -> scheduler_pb2.WorkerLoad:
    """A DecodeWorker's load for heartbeats and Stats (its gauges set on the way)."""
    load = scheduler_pb2.WorkerLoad(
        num_waiting=worker.handoffs.count(HandoffState.RESERVED, HandoffState.WRITING, HandoffState.READY),
        num_running=worker.handoffs.count(HandoffState.DECODING), num_free_blocks=worker.engine.num_free_blocks,
        num_total_blocks=worker.engine.kv_cache.num_blocks, num_blocks_claimed=worker.claims.num_blocks,
        num_remaining_tokens=worker.claims.num_remaining_tokens, mean_output_tokens=worker.claims.mean_output_tokens)
    metrics.observe_load(load)
    metrics.observe_preemptions(worker.engine.scheduler.num_preemptions)
    metrics.KV_BLOCKS_CACHED.set(worker.engine.prefix_cache_stats()["cached_blocks"])
    return load
