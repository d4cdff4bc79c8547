"""One request's state inside the engine: its tokens, its KV blocks, and one status for its whole life."""

from __future__ import annotations

import enum
import random

import torch

from kvmesh.services.engine.sampler import SamplingParams


class SequenceStatus(enum.Enum):
    """WAITING -> RUNNING -> (PREEMPTED -> WAITING ...) -> one of the finished states."""

    RESERVED = "reserved"  # decode side: blocks held for a prompt a prefill worker is filling
    WAITING = "waiting"
    RUNNING = "running"
    SPILLED = "spilled"  # decode side: some KV blocks are in the cache service, waiting for free blocks
    PAGING_BACK = "paging_back"  # decode side: blocks allocated again, the cache is delivering the KV into them
    PREFILLED = "prefilled"  # prefill side: first token sampled, blocks kept until release()
    FINISHED_STOPPED = "stop"
    FINISHED_LENGTH = "length"
    FINISHED_ABORTED = "abort"

    @property
    def finished(self) -> bool:
        return self in (SequenceStatus.FINISHED_STOPPED, SequenceStatus.FINISHED_LENGTH,
                        SequenceStatus.FINISHED_ABORTED)


class Sequence:
    """Prompt plus output tokens; `num_computed_tokens` of them already have KV in `block_table`."""

    def __init__(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams, arrival: int,
                 device: str = "cpu", prefill_only: bool = False):
        self.request_id = request_id
        self.token_ids = list(prompt_token_ids)
        self.num_prompt_tokens = len(prompt_token_ids)
        self.params = params
        self.arrival = arrival
        self.prefill_only = prefill_only
        self.status = SequenceStatus.WAITING
        self.block_table: list[int] = []
        self.num_computed_tokens = 0
        self.num_cached_tokens = 0
        self.cache_salt = ""  # tenant salt of its block hashes: blocks are shared only within one salt
        self.block_hashes: list[bytes] = []  # chained hashes of its leading full blocks, computed as they complete
        self.num_hashed_blocks = 0  # leading blocks of block_table offered to the prefix cache
        self.spilled: list[int] = []  # positions in block_table whose KV is in the cache service (entry -1 there)
        self.num_emitted = 0  # output tokens already handed out in a RequestOutput
        self.num_safe = 0  # output tokens that cannot be part of a stop string
        self.logprobs: list = []  # one entry per output token when params.logprobs is set
        self.matcher = None  # its place in params.structured's grammar (structured.Matcher), when constrained
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(params.seed if params.seed is not None else random.getrandbits(63))

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def num_uncomputed_tokens(self) -> int:
        return len(self.token_ids) - self.num_computed_tokens
