"""`LLMEngine`: the facade services drive from one dedicated thread (it is not thread-safe).

A request's life: `add_request` -> `step()` ... (each step returns the new tokens of every request that made
progress) -> a final `RequestOutput` with `finished=True`. Disaggregated serving adds two paths:

* decode side: `reserve` blocks for a prompt, let a prefill worker write its KV into them, then
  `add_prefilled` with the first token; the next `step()` emits that token (together with the next one, whose
  decode runs in the same step) and decoding continues. `release` frees a reservation or a running request.
* prefill side: `add_request(..., prefill_only=True)` prefills the prompt (batched and chunked like any other),
  returns the first token with `finish_reason="prefill"`, and keeps the blocks (`block_table`) until
  `release`. With `num_cached_tokens=k` the caller has `reserve`d the blocks and imported the first k tokens'
  KV into them; only the rest is computed. `set_layer_hook` lets the caller stream KV out layer by layer.

With `enable_prefix_caching` complete full blocks stay findable by chained hash after their owners let go
(prefix_cache.py): `add_request` and `reserve_prompt` share a prompt's leading cached blocks instead of
recomputing or refilling them. Services reach the pool only through `lookup_blocks` and `export_blocks`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np

from kvmesh.services.engine.errors import InvalidRequestError, OutOfBlocksError
from kvmesh.services.engine.kv_cache import BlockAllocator, KVCache
from kvmesh.services.engine.loader import load_model
from kvmesh.services.engine.model import LlamaModel
from kvmesh.services.engine.output import RequestOutput, StopChecker, eos_token_ids
from kvmesh.services.engine.prefix_cache import KVEvents, PrefixCache, PrefixCachingAllocator
from kvmesh.services.engine.reservations import Reservation, Reservations
from kvmesh.services.engine.sampler import SamplingParams
from kvmesh.services.engine.scheduler import Scheduler
from kvmesh.services.engine.sequence import Sequence, SequenceStatus
from kvmesh.services.engine.step import append_tokens, forward_step
from kvmesh.services.engine.structured import Grammars
from kvmesh.services.engine.swap import Swap
from kvmesh.services.engine.validation import validate_request
from kvmesh.services.kv_identity import KVLayout

__all__ = ["LLMEngine", "OutOfBlocksError", "RequestOutput", "Reservation", "SamplingParams"]


class LLMEngine:
    """Continuous-batching inference over a paged KV cache for one Llama-family model."""

    def __init__(self, model: LlamaModel, tokenizer, layout: KVLayout, kv_cache: KVCache, max_model_len: int,
                 max_num_batched_tokens: int = 2048, max_num_seqs: int = 64, enable_prefix_caching: bool = False):
        self.model, self.tokenizer, self.layout, self.kv_cache = model, tokenizer, layout, kv_cache
        self.max_model_len, self.enable_prefix_caching = max_model_len, enable_prefix_caching
        self.vocab_size = model.config.vocab_size
        self.eos_token_ids = eos_token_ids(model.config, tokenizer)
        self.allocator = (PrefixCachingAllocator if enable_prefix_caching else BlockAllocator)(kv_cache.num_blocks)
        self.prefix_cache = PrefixCache(self.allocator, layout) if enable_prefix_caching else None
        self.scheduler = Scheduler(self.allocator, layout.block_size, max_num_batched_tokens, max_num_seqs,
                                   self.prefix_cache)
        self.stops = StopChecker(tokenizer, self.eos_token_ids, max_model_len)
        self.grammars = Grammars(tokenizer, self.vocab_size, self.eos_token_ids)  # compile() is thread-safe
        self._seqs: dict[str, Sequence] = {}  # waiting, running and prefilled (held) sequences
        self.reservations = Reservations(self.allocator, layout, self.prefix_cache)
        self._pending: list[Sequence] = []  # to be emitted by the next step even if not scheduled
        self._aborted: list[RequestOutput] = []
        self._arrivals = 0
        self._layer_hook: Callable[[int, list[str]], None] | None = None
        # request id -> (first position, number of tokens) computed by the step now running (or last run):
        # tells a layer hook which slots of block_table(request_id) the step has just written
        self.step_chunks: dict[str, tuple[int, int]] = {}
        self.speculator = None  # a speculative.NgramSpeculator: drafts tokens for greedy decodes when set

    @classmethod
    def from_path(cls, path: str | Path, dtype: str = "auto", device: str = "cpu", block_size: int = 16,
                  num_blocks: int | None = None, kv_cache_bytes: int | None = None,
                  max_num_batched_tokens: int = 2048, max_num_seqs: int = 64,
                  kv_storage: np.ndarray | Callable[[int, int, int], np.ndarray] | None = None,
                  enable_prefix_caching: bool = False, tensor_parallel_size: int = 1) -> "LLMEngine":
        """Load a local HF checkpoint folder (over tensor_parallel_size ranks: tp.py) and size the KV pool.

        kv_storage: the pool's memory, or a function (num_layers, num_blocks, block_nbytes) -> that memory.
        """
        if block_size <= 0 or max_num_batched_tokens <= 0 or max_num_seqs <= 0:
            raise InvalidRequestError("block_size, max_num_batched_tokens and max_num_seqs must be positive")
        model, tokenizer, kv = load_model(path, dtype, device, block_size, num_blocks, kv_cache_bytes, max_num_seqs,
                                          kv_storage, tensor_parallel_size)
        return cls(model, tokenizer, kv.layout, kv, model.config.max_position_embeddings, max_num_batched_tokens,
                   max_num_seqs, enable_prefix_caching)

    # ---- requests -------------------------------------------------------------------------------------------

    def lookup_blocks(self, block_hashes: list[bytes]) -> list[int]:
        """The pool's blocks holding the leading `block_hashes` (stops at the first miss; shares nothing); [] when
        prefix caching is off."""
        return self.prefix_cache.allocator.lookup(list(block_hashes)) if self.prefix_cache else []

    def export_blocks(self, block_ids: list[int]) -> np.ndarray:
        """A copy of the given blocks' KV, uint8 [num_layers, 2, len(block_ids), block_nbytes]: what prefill
        offers and decode write-back hand to the cache."""
        return self.kv_cache.export_blocks(block_ids)

    @property
    def num_free_blocks(self) -> int:
        """Blocks an allocation can get: free plus cached-free (evictable) ones."""
        return self.allocator.num_free_blocks

    def prefix_cache_stats(self) -> dict[str, int]:
        """Findable blocks, of them cached-free, blocks shared (hits) and evictions so far; zeros when off."""
        return self.prefix_cache.stats() if self.prefix_cache else dict.fromkeys(PrefixCache.STATS, 0)

    def kv_events(self, full: bool, max_hashes: int) -> KVEvents:
        """What the prefix cache stored and removed since the last call (all it holds if `full` or past max_hashes)."""
        return self.prefix_cache.events(full, max_hashes) if self.prefix_cache else KVEvents(full=full)

    def validate(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        """Raise InvalidRequestError when the request cannot be served as asked."""
        validate_request(prompt_token_ids, params, self.max_model_len, self.vocab_size, self.layout,
                         self.kv_cache.num_blocks)

    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                    prefill_only: bool = False, num_cached_tokens: int = 0, cache_salt: str = "") -> None:
        """Queue a request; with prefill_only it stops after the first token and keeps its blocks.

        Without a reservation and with prefix caching on, the prompt's leading cached blocks are shared when it
        is admitted and only the rest is computed. A reservation's shared blocks count as cached whatever
        num_cached_tokens.
        """
        self.validate(prompt_token_ids, params)
        self._check_new_id(request_id, allow_reserved=True)
        matcher = self.grammars.matcher_for(params, prompt_token_ids)
        n = len(prompt_token_ids)
        if num_cached_tokens % self.layout.block_size or not 0 <= num_cached_tokens < n:
            raise InvalidRequestError(
                f"num_cached_tokens must be a multiple of block_size {self.layout.block_size} below the prompt "
                f"length {n}, got {num_cached_tokens}")
        if num_cached_tokens and request_id not in self.reservations:
            raise InvalidRequestError("num_cached_tokens > 0 needs blocks from reserve() holding that KV first")
        blocks = []
        reservation = None
        if request_id in self.reservations:
            reservation = self.reservations.take(request_id, n)
            cache_salt = reservation.cache_salt or cache_salt
            num_cached_tokens = max(num_cached_tokens, reservation.num_cached_tokens)
            blocks = reservation.block_ids
        seq = self._new_seq(request_id, prompt_token_ids, params, prefill_only, cache_salt, matcher)
        seq.block_table = blocks
        seq.block_hashes = list(reservation.block_hashes) if reservation else []
        seq.num_computed_tokens = seq.num_cached_tokens = num_cached_tokens
        seq.num_hashed_blocks = num_cached_tokens // self.layout.block_size
        self.scheduler.add(seq)

    def abort(self, request_id: str) -> None:
        """Stop a request and free its blocks; its last output says finish_reason="abort". Idempotent."""
        if self._drop(request_id):
            self._aborted.append(RequestOutput(request_id, [], True, "abort", None, 0, 0))

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished() or bool(self._pending or self._aborted)

    # ---- disaggregation -------------------------------------------------------------------------------------

    def reserve(self, request_id: str, num_prompt_tokens: int) -> list[int]:
        """Allocate the blocks a prompt of `num_prompt_tokens` needs; OutOfBlocksError when there is no room."""
        self._check_reservation(request_id, num_prompt_tokens)
        return self.reservations.reserve(request_id, num_prompt_tokens)

    def reserve_prompt(self, request_id: str, prompt_token_ids: list[int], cache_salt: str = "",
                       block_hashes: list[bytes] | None = None) -> Reservation:
        """Reserve a prompt's blocks: its leading cached full blocks shared (never the block of its last token),
        fresh ones for the rest. `block_hashes`: its reusable blocks' hashes when the caller has them (the route
        plan's), so the prompt is not hashed again. OutOfBlocksError when the fresh ones do not fit (nothing is
        taken then)."""
        self._check_reservation(request_id, len(prompt_token_ids))
        return self.reservations.reserve_prompt(request_id, prompt_token_ids, cache_salt, block_hashes)

    def add_prefilled(self, request_id: str, prompt_token_ids: list[int], first_token_id: int,
                      params: SamplingParams, first_logprob: dict | None = None) -> None:
        """Start decoding a reserved request whose prompt KV is in its blocks and whose first token is known (with
        its logprob entry, when the prefill worker computed one: it is reported with the token)."""
        self.validate(prompt_token_ids, params)
        if request_id not in self.reservations:
            raise InvalidRequestError(f"request {request_id!r} has no reservation; call reserve() first")
        if not 0 <= first_token_id < self.vocab_size:
            raise InvalidRequestError(f"first_token_id {first_token_id} lies outside [0, {self.vocab_size})")
        matcher = self.grammars.matcher_for(params, prompt_token_ids, first_token_id)
        reservation = self.reservations.take(request_id, len(prompt_token_ids))
        seq = self._new_seq(request_id, prompt_token_ids, params, False, reservation.cache_salt, matcher)
        seq.block_table = reservation.block_ids
        seq.block_hashes = list(reservation.block_hashes)  # computed here: the pool caches its blocks by them
        seq.num_cached_tokens = reservation.num_cached_tokens
        seq.num_computed_tokens = len(prompt_token_ids)
        if self.prefix_cache:  # the KV landed and was verified: the prompt's full blocks are complete
            self.prefix_cache.cache_blocks(seq)
        append_tokens(self.stops, seq, [first_token_id], [first_logprob])
        self._pending.append(seq)
        if seq.status.finished:
            self._finish(seq)
        else:
            self.scheduler.add_running(seq)

    def enable_spill(self, emit: Callable[[object], None]) -> None:
        """Spill blocks to a store instead of preempting (swap.py); emit(SpillOut | PageIn) runs on this thread."""
        self.scheduler.swap = Swap(self.kv_cache.export_blocks, emit, self.layout.block_size)

    def paged_back(self, request_id: str, ok: bool) -> None:
        """A PageIn ended: the sequence resumes (ok: its KV is in its blocks) or is recomputed. Unknown: no-op."""
        seq = self._seqs.get(request_id)
        if seq is not None and self.scheduler.swap is not None:
            self.scheduler.swap.paged_back(self.scheduler, seq, ok)

    def release(self, request_id: str) -> None:
        """Free a reservation, a prefilled request's kept blocks, or a live request. Idempotent."""
        self._drop(request_id)

    def block_table(self, request_id: str) -> list[int]:
        """The block ids holding a request's KV (reserved, live or prefilled)."""
        if request_id in self.reservations:
            return self.reservations.block_ids(request_id)
        if request_id in self._seqs:
            return list(self._seqs[request_id].block_table)
        raise InvalidRequestError(f"unknown request {request_id!r}")

    def set_layer_hook(self, fn: Callable[[int, list[str]], None] | None) -> None:
        """fn(layer_index, request ids whose prompt this step completes), called after each layer's KV is written.

        Called on the engine thread inside step(); `step_chunks[request_id]` gives the positions written.
        """
        self._layer_hook = fn

    # ---- the step -------------------------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """Run one forward step over the scheduled batch; return the progress of every request it touched."""
        outputs, self._aborted = self._aborted, []
        touched, self._pending = list(self._pending), []
        scheduled = self.scheduler.schedule()
        if scheduled:
            self._run(scheduled)
            touched += [seq for seq, _ in scheduled if seq not in touched]
        return outputs + [out for out in map(self.stops.emit, touched) if out is not None]

    def _run(self, scheduled: list[tuple[Sequence, int]]) -> None:
        drafts = self.speculator.plan(scheduled, self.scheduler) if self.speculator else {}
        self.step_chunks = {seq.request_id: (seq.num_computed_tokens, n + len(drafts.get(seq.request_id, ())))
                            for seq, n in scheduled}  # a verify span writes (and costs) its K+1 positions
        sampled = forward_step(self.model, self.kv_cache, scheduled, self._layer_hook, drafts)
        for seq, n in scheduled:
            seq.num_computed_tokens += n
            if self.prefix_cache and seq.request_id not in drafts:
                self.prefix_cache.cache_blocks(seq)
        for seq, tokens, infos in sampled:
            draft = drafts.get(seq.request_id)
            if draft:
                tokens, infos = self.speculator.accept(draft, tokens, infos)
            append_tokens(self.stops, seq, tokens, infos)
            if draft:
                self.speculator.settle(seq, self.scheduler, self.prefix_cache)
            if seq.status.finished or seq.status is SequenceStatus.PREFILLED:
                self._finish(seq)

    def _finish(self, seq: Sequence) -> None:
        """A sequence is done: leave the batch; free its blocks unless a prefill caller still needs them."""
        self.scheduler.remove(seq)
        if seq.status is SequenceStatus.PREFILLED:
            return
        self.scheduler.free_blocks(seq)
        self._seqs.pop(seq.request_id, None)

    def _new_seq(self, request_id: str, ids: list[int], params: SamplingParams, prefill_only: bool,
                 cache_salt: str = "", matcher=None) -> Sequence:
        seq = Sequence(request_id, [int(t) for t in ids], params, self._arrivals, self.model.device, prefill_only)
        seq.cache_salt, seq.matcher = cache_salt, matcher
        self._arrivals += 1
        self._seqs[request_id] = seq
        return seq

    def _check_new_id(self, request_id: str, allow_reserved: bool = False) -> None:
        if request_id in self._seqs or (request_id in self.reservations and not allow_reserved):
            raise InvalidRequestError(f"request id {request_id!r} is already in use")

    def _check_reservation(self, request_id: str, num_prompt_tokens: int) -> None:
        self._check_new_id(request_id)
        if self.scheduler.num_swapped:  # as vLLM: nothing new starts while swapped sequences wait for blocks
            raise OutOfBlocksError(f"{self.scheduler.num_swapped} spilled sequences come back first")
        if num_prompt_tokens <= 0 or num_prompt_tokens >= self.max_model_len:
            raise InvalidRequestError(f"num_prompt_tokens must lie in [1, {self.max_model_len}), got {num_prompt_tokens}")

    def _drop(self, request_id: str) -> bool:
        """Forget a request and free whatever blocks it holds; False if it was unknown."""
        if self.reservations.release(request_id):
            return True
        seq = self._seqs.pop(request_id, None)
        if seq is None:
            return False
        self.scheduler.remove(seq)
        self.scheduler.free_blocks(seq)
        if seq in self._pending:
            self._pending.remove(seq)
        seq.status = SequenceStatus.FINISHED_ABORTED
        return True

