"""What the decode worker tells the schedulers about its load beyond the counts: the KV blocks its requests will
take (admission counts them against the pool), the requests that reached it (so a scheduler keeps counting only
the routes still on their way), and each finish at once — the last message of a request goes out only after every
scheduler has seen that its blocks and queue place are free again (or a bounded wait passed), so a client that
sends its next request on seeing the end of the last is never refused for load that is gone."""

from __future__ import annotations

from kvmesh.services.common.registration import heartbeat_everywhere
from kvmesh.v1 import decode_pb2

#: Longest wait of a request's last message for the schedulers to see it finished (a slow one is not waited out).
SEEN_TIMEOUT_S = 1.0


class Claims:
    """The KV blocks each request here will hold at most (prompt + max_tokens), from its arrival to its end."""

    def __init__(self) -> None:
        self._blocks: dict[str, int] = {}
        self.registrations: list = []  # RegistrationClient per scheduler (set once registered)

    @property
    def num_blocks(self) -> int:
        """Blocks claimed by every request here (WorkerLoad.num_blocks_claimed)."""
        return sum(self._blocks.values())

    def arrived(self, request_id: str, num_blocks: int) -> None:
        """A routed request reached this worker: claim its blocks, and tell each scheduler's next heartbeat."""
        self._blocks[request_id] = num_blocks
        for registration in self.registrations:
            registration.note_arrival(request_id)

    async def finished(self, request_id: str) -> None:
        """A request produced its last token: drop its claim and heartbeat every scheduler now (bounded wait)."""
        self._blocks.pop(request_id, None)
        await heartbeat_everywhere(self.registrations, SEEN_TIMEOUT_S)

    def ended(self, request_id: str) -> None:
        """A request ended, however: drop its claim (idempotent)."""
        self._blocks.pop(request_id, None)


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
