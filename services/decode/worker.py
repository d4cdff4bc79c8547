"""The decode worker's domain: own a request from routing to its last token.

For each request: reserve KV blocks (leading blocks this worker's prefix cache holds are shared), expect the
prefill worker's writes into the rest, ask it to prefill and send only those, wait for the last layer to land
(checksums verified), admit the sequence into the continuous batch, and stream its tokens. A short tail after a
full prefix hit is prefilled here; `--cache-decode-kv` offers decoded blocks to the cache (writeback.py); with
`--kv-spill cache` the cache is swap space (spill.py). One handoff record per request ties every resource it takes
to one release, whichever way the request ends: finish, client cancel, prefill failure, or lease expiry.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator

import grpc

from kvmesh.services import kv_identity
from kvmesh.services.common import conventions as names
from kvmesh.services.common import errors, metrics, telemetry
from kvmesh.services.decode.detokenizer import IncrementalDetokenizer
from kvmesh.services.decode.load import Claims, worker_load
from kvmesh.services.decode.failures import ended_error, peer_error, queue_refusal, transfer_error
from kvmesh.services.decode.stream import StreamWatch, TokenStream
from kvmesh.services.decode.writeback import offer_decoded_blocks
from kvmesh.services.engine.errors import OutOfBlocksError
from kvmesh.services.worker.convert import compile_grammar, logprob_entry, sampling_params
from kvmesh.services.worker.handoff import FINAL, Handoff, HandoffState, HandoffTable
from kvmesh.transports import TransportError
from kvmesh.v1 import common_pb2, decode_pb2, prefill_pb2, prefill_pb2_grpc, scheduler_pb2

log = logging.getLogger(__name__)

RESERVE_POLL_S = 0.02
_EXPIRED = object()


class DecodeWorker:
    """Requests in flight on this decode worker."""

    def __init__(self, engine_thread, receiver, channels, lease_s: float, queue_timeout_s: float = 30.0,
                 local_prefill_max_tokens: int = 0, kv_events_max_hashes: int = 4096, cache=None, reporter=None,
                 kv_load_failure: str = "fail", spill=None):
        self.et, self.engine = engine_thread, engine_thread.engine
        self.reporter = reporter  # a FailureReporter: tells the scheduler of prefill workers it cannot reach
        self.cache = cache  # a CacheClient to offer decoded blocks to (--cache-decode-kv), or None
        self.receiver, self.channels = receiver, channels
        self.handoffs = HandoffTable(lease_s)
        if receiver is not None:  # each layer or chunk of KV that arrives renews its request's handoff
            receiver.progress_listener = self.handoffs.renew
        self.queue_timeout_s = queue_timeout_s
        self.local_prefill_max_tokens = local_prefill_max_tokens
        self.kv_events_max_hashes = kv_events_max_hashes
        self.kv_load_failure = kv_load_failure  # "fail" or "recompute": what a failed or corrupt transfer does
        self.tokenizer = self.engine.tokenizer
        self.prefilling: set[str] = set()  # requests prefilled here whose first output has not come yet
        self.claims = Claims()  # KV blocks each request will take; arrivals and finishes told to the schedulers
        self.spill = spill  # a spill.Spiller (--kv-spill cache): the cache as swap space; None: preempt

    # ---- load, for heartbeats and Stats ----

    def load(self) -> scheduler_pb2.WorkerLoad:
        return worker_load(self)

    async def kv_events(self, full: bool) -> scheduler_pb2.KVEvents:
        """What the prefix cache stored and evicted since the last call (everything, when full): for heartbeats."""
        events = await self.et.call(self.engine.kv_events, full, self.kv_events_max_hashes)
        return scheduler_pb2.KVEvents(stored=list(events.stored), removed=list(events.removed), full=events.full)

    async def keep_prefilling_alive(self, _server=None) -> None:
        """Background task: a request this worker prefills itself waits in its running engine behind other prompts
        (the plan may send long ones here when the prefill queues are longer): alive, not stalled — renew its
        handoff a third of a lease at a time until its first output renews it; so is one whose KV is spilled."""
        while True:
            await asyncio.sleep(self.handoffs.lease_s / 3)
            if self.et.alive:
                for rid in [*self.prefilling, *(self.spill.swapped if self.spill else ())]:
                    self.handoffs.renew(rid)

    def _track_spill(self, rid: str) -> None:
        if self.spill is not None:  # the spiller renews a swapped-out request's handoff and frees its spilled KV
            self.spill.track(rid, self.handoffs)

    async def _add_here(self, rid: str, ids: list[int], params, cache_salt: str) -> None:
        """Hand a prompt this worker prefills itself to its engine; its handoff is renewed until its first output."""
        self.prefilling.add(rid)
        self._track_spill(rid)  # before the engine sees it
        await self.et.call(self.engine.add_request, rid, ids, params, cache_salt=cache_salt)

    # ---- one request ----

    async def _reserve(self, request: decode_pb2.DecodeRequest, ids: list[int]):
        """The prompt's blocks (cached leading ones shared), under the `decode.queue` span; wait a while for blocks
        to free up before giving up with RESOURCE_EXHAUSTED. Returns (Reservation, seconds queued)."""
        rid, queued, record = request.request_id, time.perf_counter(), self.handoffs.get(request.request_id)
        loop = asyncio.get_running_loop()
        budget = request.ttft_budget_seconds  # the client's TTFT objective: past it, refused rather than late
        patience = min(self.queue_timeout_s, budget) if budget > 0 else self.queue_timeout_s
        deadline = loop.time() + patience
        # before the reserve: a cancelled call still reserves in the engine thread, and the release queued after it
        # frees what it took (release is idempotent, and a no-op when nothing was reserved)
        self.handoffs.on_release(rid, lambda: self.et.call(self.engine.release, rid))
        with telemetry.tracer().start_as_current_span(names.DECODE_QUEUE) as span:
            while True:
                if record.state in FINAL:  # aborted or stopping while it waited: a reserve now would leak
                    raise ended_error(record)
                self.handoffs.renew(rid)  # waiting for blocks is progress: queue_timeout_s bounds it, not the lease
                try:
                    reservation = await self.et.call(self.engine.reserve_prompt, rid, ids, request.cache_salt,
                                                     self._plan_hashes(request, ids) or None)
                    break
                except OutOfBlocksError as e:
                    if loop.time() > deadline:
                        raise queue_refusal(len(ids), patience, patience < self.queue_timeout_s, e) from None
                    await asyncio.sleep(RESERVE_POLL_S)
            span.set_attributes({names.ATTR_KV_BLOCKS: len(reservation.block_ids), names.ATTR_DECODE_HIT_BLOCKS:
                                 reservation.num_cached_tokens // self.engine.layout.block_size})
        queue_s = time.perf_counter() - queued
        metrics.REQUEST_QUEUE_TIME.labels(stage="decode").observe(queue_s)
        if self.engine.enable_prefix_caching:
            metrics.PREFIX_CACHE_QUERIES.inc(kv_identity.reusable_tokens(len(ids), self.engine.layout.block_size))
            metrics.PREFIX_CACHE_HITS.inc(reservation.num_cached_tokens)
        return reservation, queue_s

    def _plan_hashes(self, request: decode_pb2.DecodeRequest, ids: list[int]) -> list[bytes]:
        """The plan's hashes of the prompt's reusable blocks, if they can be the prompt's (count, size); [].

        Used to look this pool up (a wrong hash only misses, or shares KV with this request alone); the blocks a
        prefill worker fills are cached here under hashes chained here (never under a peer's)."""
        return kv_identity.check_prompt_hashes(request.prompt_block_hashes, len(ids), self.engine.layout.block_size)

    def _prefill_here(self, request: decode_pb2.DecodeRequest, reservation, num_prompt_tokens: int) -> bool:
        """The plan's decision (obeyed); for a plan that does not say, the same rule as the scheduler's: every
        reusable block is cached here and the tail is short (cheaper than a round trip and a transfer)."""
        if request.HasField("local_prefill"):
            return request.local_prefill
        return kv_identity.prefill_locally(num_prompt_tokens, reservation.num_cached_tokens,
                                           self.engine.layout.block_size, self.local_prefill_max_tokens)

    async def _remote_prefill(self, request: decode_pb2.DecodeRequest, ids: list[int], reservation, queue_s: float,
                              timeout: float):
        """Have the prefill worker fill this request's reserved blocks past the shared ones; return its
        PrefillResponse and the Timings so far, or (None, None) when the transfer failed and the policy is to
        recompute (the prefill call is cancelled and no sender can write into the blocks any more)."""
        rid, record = request.request_id, self.handoffs.get(request.request_id)
        skip = reservation.num_cached_tokens // self.engine.layout.block_size
        blocks = reservation.block_ids[skip:]
        self._advance(record, HandoffState.WRITING)  # first: a request that ended while queued expects nothing
        self.receiver.expect(rid, blocks, lease_s=self.handoffs.lease_s)
        self.handoffs.on_release(rid, lambda: self.receiver.retire(rid))  # before the blocks are freed
        stub = prefill_pb2_grpc.PrefillStub(self.channels.get(request.prefill.address))
        # hashes chain per block size: a prefill worker of another block size hashes the prompt itself
        same_chain = request.prefill.block_size in (0, self.engine.layout.block_size)
        call = prefill_pb2.PrefillRequest(
            request_id=rid, prompt_token_ids=ids, sampling=request.sampling,
            destination=self.receiver.descriptor(), destination_blocks=common_pb2.BlockRef(block_ids=blocks),
            cache_salt=request.cache_salt, trace_context=telemetry.inject({}), num_skip_blocks=skip,
            prompt_block_hashes=(self._plan_hashes(request, ids) or reservation.block_hashes) if same_chain else ())
        if request.kv_peer_address or (request.cache_probed and same_chain):  # the plan says what to fetch, whence
            call.cached_prefix_tokens, call.kv_peer_address = request.cached_prefix_tokens, request.kv_peer_address
        reply = stats = None
        prefill = asyncio.ensure_future(stub.Prefill(call, timeout=timeout))
        landed = asyncio.ensure_future(self.receiver.wait(rid, timeout=timeout))
        try:
            with telemetry.tracer().start_as_current_span(names.DECODE_WAIT_KV):
                done, _ = await asyncio.wait({prefill, landed}, return_when=asyncio.FIRST_EXCEPTION)
                for task in done:
                    task.result()  # the first failure, if any, raises here
                reply, stats = await prefill, await landed
        except (grpc.aio.AioRpcError, TransportError) as e:
            if record.state in FINAL:  # the request ended meanwhile (lease lapsed, aborted): that is the cause
                raise ended_error(record) from None
            if not isinstance(e, TransportError):
                if self.reporter is not None and errors.unreachable(e):
                    self.reporter.report(request.prefill.worker_id, request.prefill.address,
                                         scheduler_pb2.WORKER_ROLE_PREFILL, e)
                raise peer_error(request.prefill.address, e) from None
            metrics.KV_LOAD_FAILURES.labels(policy=self.kv_load_failure).inc()
            if self.kv_load_failure != "recompute":
                raise transfer_error(e, request.prefill.address) from None
            log.warning("request %s: KV transfer from %s failed (%s); prefilling it here instead", rid,
                        request.prefill.address, e)
        finally:
            for task in (prefill, landed):
                task.cancel()
            await asyncio.gather(prefill, landed, return_exceptions=True)
        if reply is None:
            await self.receiver.retire(rid)  # fenced: a one-sided sender can no longer write into the blocks
            return None, None
        self._advance(record, HandoffState.READY)  # the KV landed: unless the request ended meanwhile
        timings = common_pb2.Timings(queue_seconds=queue_s, prefill_compute_seconds=reply.compute_seconds,
                                     kv_transfer_seconds=stats.seconds, kv_transfer_bytes=stats.bytes,
                                     kv_transport=stats.backend, decode_cached_tokens=reservation.num_cached_tokens)
        return reply, timings

    async def generate(self, request: decode_pb2.DecodeRequest, timeout: float
                       ) -> AsyncIterator[decode_pb2.DecodeResponse]:
        """Serve one routed request; every resource it takes is released when this generator ends."""
        rid, ids = request.request_id, list(request.prompt_token_ids)
        arrival_ns, start = time.time_ns(), time.perf_counter()
        params = sampling_params(request.sampling)
        await self.et.call(self.engine.validate, ids, params)
        await compile_grammar(self.engine, params)
        record = self.handoffs.open(rid)
        outputs = self.et.subscribe(rid)
        self.handoffs.on_release(rid, lambda: outputs.put_nowait(_EXPIRED))
        stream = TokenStream(IncrementalDetokenizer(self.tokenizer, ids), len(ids), start)
        watch = StreamWatch(arrival_ns)  # not made current: the context must not stay attached across yields
        try:
            growth = 1 if self.spill else params.max_tokens  # with spill the rest is borrowed (as admission counts)
            self.claims.arrived(rid, self.engine.layout.num_blocks_for(len(ids) + growth), params.max_tokens)
            reservation, remote = None, False
            if request.prefill.address:
                reservation, queue_s = await self._reserve(request, ids)
                stream.timings = common_pb2.Timings(queue_seconds=queue_s,
                                                    decode_cached_tokens=reservation.num_cached_tokens)
            reply = None
            if reservation is not None and not self._prefill_here(request, reservation, len(ids)):
                reply, timings = await self._remote_prefill(request, ids, reservation, queue_s, timeout)
            if reply is not None:
                remote, stream.timings = True, timings
                stream.cached = max(reply.num_cached_tokens, reservation.num_cached_tokens)
                await self._admit(rid, ids, reply, params)
                self._advance(record, HandoffState.DECODING)
                if not params.stop:  # the first token is final: send it now, not after a decode step
                    first = [reply.first_logprob] if reply.HasField("first_logprob") else []
                    watch.tokens(1)
                    yield stream.early(reply.first_token_id, first)
            else:  # prefill here (the plan's choice, or a failed transfer's recompute)
                await self._prefill_locally(request, ids, params, record, reservation is None)
            while True:
                out = await outputs.get()
                self.prefilling.discard(rid)
                if out is _EXPIRED:
                    raise ended_error(record)
                if out.finished and out.finish_reason == "abort":  # an explicit status, never a quiet end
                    raise errors.UnavailableError(f"request {rid} was aborted on the decode worker")
                self.handoffs.renew(rid)
                response = stream.response(out)
                watch.tokens(len(response.token_ids))
                self.claims.generated(rid, len(response.token_ids))
                if out.finished and out.finish_reason != "abort":  # before the last yield: the caller may stop there
                    await self._finished(request, ids, out, stream.token_ids, remote)
                yield response
                if out.finished:
                    return
        finally:
            self.prefilling.discard(rid)
            self.claims.ended(rid)
            watch.end(stream.num_generated)
            self.et.unsubscribe(rid)
            if not await self.handoffs.end(rid):  # it ended before (expired, aborted): free what was taken since
                await self.et.call(self.engine.release, rid)  # idempotent: a no-op when nothing is held
                await self.receiver.retire(rid)

    async def _finished(self, request: decode_pb2.DecodeRequest, ids: list[int], out, token_ids: list[int],
                        remote: bool) -> None:
        """A request's last token is out: offer its decoded blocks to the cache, and let the schedulers see it gone
        before the client does."""
        # the prefill worker offered the prompt's full blocks; of a prompt prefilled here, none
        offered = len(ids) if remote else out.num_cached_tokens
        bs = self.engine.layout.block_size
        offer_decoded_blocks(self.et, self.cache, ids + token_ids, offered // bs, request.cache_salt,
                             out.block_hashes[:len(ids) // bs])
        await self.claims.finished(request.request_id)

    async def _prefill_locally(self, request: decode_pb2.DecodeRequest, ids: list[int], params, record: Handoff,
                               unreserved: bool) -> None:
        """Prefill the prompt in this worker's batch: a reservation's shared blocks (or the engine's own lookup)
        count as cached, and its other blocks, whatever a failed transfer left in them, are computed again."""
        rid = request.request_id
        if unreserved:
            self.handoffs.on_release(rid, lambda: self.et.call(self.engine.release, rid))
        await self._add_here(rid, ids, params, request.cache_salt)
        self._advance(record, HandoffState.READY)
        self._advance(record, HandoffState.DECODING)

    async def _admit(self, rid: str, ids: list[int], reply: prefill_pb2.PrefillResponse, params) -> None:
        """Join a request whose KV landed into the batch, with the prefill worker's first token and its logprob
        (reported with the token when the token is not sent early: a stop string may still cut it)."""
        first = logprob_entry(reply.first_logprob) if reply.HasField("first_logprob") else None
        self._track_spill(rid)
        with telemetry.tracer().start_as_current_span(names.DECODE_ADMIT):
            await self.et.call(self.engine.add_prefilled, rid, ids, reply.first_token_id, params, first_logprob=first)

    def _advance(self, record: Handoff, state: HandoffState) -> None:
        """Move a request's handoff on; if it has ended meanwhile (lease lapsed, aborted, worker stopping), raise
        why, as a status: its blocks are already freed, and a late transfer for it is refused, not an error."""
        if record.state in FINAL:
            raise ended_error(record)
        self.handoffs.advance(record.request_id, state)

    async def abort(self, request_id: str) -> bool:
        """Cancel a request by id; idempotent."""
        return await self.handoffs.end(request_id, HandoffState.FAILED, "aborted")

