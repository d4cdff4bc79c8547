"""The prefill worker's domain: compute a prompt's KV and write it into a decode worker's reserved blocks.

Prompts join the engine's batch like any request, marked prefill-only: the engine stops after the first token
and keeps the blocks. The engine thread calls back after each layer of a step in which a prompt's prefill
completes; each such layer is handed to the transport at once, so the transfer of layer l overlaps the compute
of layers l+1…. When the engine returns the first token, the remaining layers are flushed, the transfer is
committed (the receiver verifies every layer's checksum), and the worker's blocks are released.
"""

from __future__ import annotations

import asyncio
import logging
import time

from opentelemetry import context as otel_context

from kvmesh.services.common import conventions as names
from kvmesh.services.common import errors, metrics, telemetry
from kvmesh.services.prefill import prefix
from kvmesh.services.worker.convert import compile_grammar, logprob_protos, sampling_params
from kvmesh.services.worker.handoff import HandoffState, HandoffTable
from kvmesh.transports import TransportError
from kvmesh.v1 import decode_pb2, prefill_pb2, scheduler_pb2

log = logging.getLogger(__name__)


class LayerStream:
    """Sends one request's layers in order as the engine finishes them: the KV of prompt blocks
    first_block..num_blocks-1 (the destination holds the earlier ones already)."""

    def __init__(self, transfer, num_blocks: int, first_block: int = 0, on_sent=None):
        self.transfer, self.num_blocks, self.first_block = transfer, num_blocks, first_block
        self.on_sent = on_sent  # called after each layer is sent: the request's handoff lease measures progress
        self.queue: asyncio.Queue = asyncio.Queue()
        self.task = asyncio.ensure_future(self._run())
        self.num_layers_sent = 0
        self.num_layers_pushed = 0  # layers the engine has handed over (sent or waiting to be)
        self.layer_block_nbytes = int(transfer.pool[0, :, 0].nbytes)  # K and V of one block in one layer

    def push(self, layer: int, block_table: list[int]) -> None:
        """Called on the loop (via call_soon_threadsafe) when `layer` of this request is in the pool."""
        self.num_layers_pushed += 1
        self.queue.put_nowait((layer, block_table[self.first_block:self.num_blocks]))

    async def _run(self) -> None:
        while True:
            layer, blocks = await self.queue.get()
            if layer is None:
                return
            checksum_s = self.transfer.checksum_seconds
            with telemetry.kv_transfer_span(self.transfer.link.name, "send", len(blocks) * self.layer_block_nbytes,
                                            len(blocks), layer=layer) as span:
                await self.transfer.send_layer(layer, blocks)
                span.set_attribute(names.ATTR_KV_CHECKSUM_S, self.transfer.checksum_seconds - checksum_s)
            self.num_layers_sent += 1
            if self.on_sent is not None:
                self.on_sent()

    async def finish(self) -> None:
        """Wait until every pushed layer is sent."""
        self.queue.put_nowait((None, None))
        await self.task

    def cancel(self) -> None:
        self.task.cancel()


class PrefillWorker:
    """Prompts being prefilled on this worker."""

    def __init__(self, engine_thread, sender, lease_s: float, cache=None, receiver=None, peers=None):
        self.et, self.engine = engine_thread, engine_thread.engine
        self.sender = sender
        self.cache = cache  # a kvmesh.services.clients.cache.CacheClient, or None: compute every prompt
        self.receiver = receiver  # over this worker's own pool: the cache delivers cached prefixes into it
        self.peers = peers  # address -> a client of that decode worker's pool (prefix.PeerSources): peer pull
        self.handoffs = HandoffTable(lease_s)
        self.streams: dict[str, LayerStream] = {}
        self.compute_started: dict[str, int] = {}  # request id -> time.time_ns() its completing step began
        self._loop = asyncio.get_running_loop()
        self.engine.set_layer_hook(self._on_layer)

    def _on_layer(self, layer: int, request_ids: list[str]) -> None:
        """Engine thread: `layer` of these requests' prompts is complete in the pool."""
        for rid in request_ids:
            stream = self.streams.get(rid)
            if stream is not None:
                self.compute_started.setdefault(rid, self.et.step_started_ns)
                self._loop.call_soon_threadsafe(stream.push, layer, self.engine.block_table(rid))

    async def keep_queued_alive(self, _server=None) -> None:
        """Background task: a request waiting in this worker's running engine (queued, or its prompt computing) is
        alive, not stalled — renew its handoff here and, through its transfer, on the decode worker, a third of a
        lease at a time, until the engine has handed every layer to the transfer; from then on its bytes' progress
        is what counts. (Not from the first layer on: the layers of a prompt come out of one step, and on a loaded
        machine that step can outlast a lease between two layers.) A worker that stops (SIGSTOP, death) or whose
        engine thread died renews nothing: the leases then lapse as before, and `--prefill-timeout-s` bounds the
        wait in a queue."""
        while True:
            await asyncio.sleep(self.handoffs.lease_s / 3)
            if not self.et.alive:
                continue
            for rid, stream in list(self.streams.items()):
                if stream.num_layers_pushed < self.engine.layout.num_layers:  # the engine still owes layers
                    self.handoffs.renew(rid)
                    stream.transfer.keep_alive()

    def load(self) -> scheduler_pb2.WorkerLoad:
        load = scheduler_pb2.WorkerLoad(num_waiting=0, num_running=len(self.handoffs),
                                          num_free_blocks=self.engine.num_free_blocks,
                                          num_total_blocks=self.engine.kv_cache.num_blocks)
        metrics.observe_load(load)
        return load

    def stats(self) -> decode_pb2.WorkerStats:
        load = self.load()
        return decode_pb2.WorkerStats(num_running=load.num_running, num_free_blocks=load.num_free_blocks,
                                      num_total_blocks=load.num_total_blocks, num_handoffs=len(self.handoffs),
                                      num_transfers=self.sender.num_open_transfers + self._num_received())

    def _num_received(self) -> int:
        """Cache deliveries expected here and not yet landed or retired (0 when nothing leaks)."""
        return self.receiver.num_transfers + self.receiver.num_fences if self.receiver is not None else 0

    async def prefill(self, request: prefill_pb2.PrefillRequest, timeout: float) -> prefill_pb2.PrefillResponse:
        """Prefill one prompt into the destination's blocks; return its first token.

        Continues the caller's trace: from the gRPC metadata (the server interceptor), else from
        `request.trace_context`, so the queue, compute and KV-transfer spans are children of the request's trace.
        """
        if telemetry.has_span() or not request.trace_context:
            return await self._prefill(request, timeout)
        token = otel_context.attach(telemetry.extract(dict(request.trace_context)))
        try:
            return await self._prefill(request, timeout)
        finally:
            otel_context.detach(token)

    async def _prefill(self, request: prefill_pb2.PrefillRequest, timeout: float) -> prefill_pb2.PrefillResponse:
        rid, ids = request.request_id, list(request.prompt_token_ids)
        params = sampling_params(request.sampling)
        dst, needed, skip, offset = self._checked(request, ids, params)
        await compile_grammar(self.engine, params)
        self.handoffs.open(rid)
        outputs = self.et.subscribe(rid)
        transfer_done = False
        try:
            transfer = await self.sender.open(request.destination, rid, dst, timeout=timeout,
                                              src_token_offset=offset)
            # posted, not awaited: the answer must not wait for the next request's prefill step to end
            self.handoffs.on_release(rid, lambda: self.et.post(self.engine.release, rid))
            self.handoffs.on_release(rid, lambda: None if transfer_done else transfer.abort())
            stream = self.streams[rid] = LayerStream(transfer, needed, skip, lambda: self.handoffs.renew(rid))
            self.handoffs.on_release(rid, stream.cancel)
            self.handoffs.advance(rid, HandoffState.WRITING)
            if self.receiver is not None:  # runs before the blocks are released (cleanups run last first)
                self.handoffs.on_release(rid, lambda: self.receiver.retire(prefix.fetch_transfer_id(rid)))
            source = self.peers(request.kv_peer_address) if request.kv_peer_address and self.peers else self.cache
            hashes, hashed_here = prefix.prompt_chain(source, self.engine.layout, ids, request.cache_salt,
                                                      request.prompt_block_hashes)
            probed = request.cached_prefix_tokens if request.HasField("cached_prefix_tokens") else None
            num_cached = await prefix.import_prefix(self.et, source, self.receiver, rid, ids, hashes, probed)
            start, submitted_ns = time.perf_counter(), time.time_ns()
            await self.et.call(self.engine.add_request, rid, ids, params, prefill_only=True,
                               num_cached_tokens=num_cached)
            out = await asyncio.wait_for(outputs.get(), timeout)
            compute_s = time.perf_counter() - start
            _record_compute(submitted_ns, self.compute_started.pop(rid, 0), len(ids), out.num_cached_tokens)
            if out.finish_reason != "prefill" or not out.new_token_ids:
                raise errors.UnavailableError(f"prefill of {rid} ended with {out.finish_reason!r}")
            known = hashes if hashed_here else hashes[:num_cached // self.engine.layout.block_size]
            prefix.offer_new_blocks(self.et, self.cache, rid, ids, request.cache_salt, num_cached, known)
            await stream.finish()
            stats = await transfer.commit()
            transfer_done = True
            self.handoffs.advance(rid, HandoffState.READY)
        except TransportError as e:
            raise self._transfer_error(rid, request.destination.address, e) from None
        except asyncio.TimeoutError:
            raise errors.DeadlineError(f"prefill of {rid} did not finish within {timeout:.1f} s") from None
        finally:
            self.compute_started.pop(rid, None)
            self.streams.pop(rid, None)
            self.et.unsubscribe(rid)
            if not await self.handoffs.end(rid):  # it expired before: free what the engine took since (idempotent)
                await self.et.call(self.engine.release, rid)
        logprobs = logprob_protos(out.new_token_ids[:1], out.logprobs)
        return prefill_pb2.PrefillResponse(
            first_token_id=out.new_token_ids[0], first_logprob=logprobs[0] if logprobs else None,
            num_cached_tokens=out.num_cached_tokens, compute_seconds=compute_s,
            transfer=prefill_pb2.TransferSummary(backend=stats.backend, bytes=stats.bytes, blocks=stats.blocks,
                                                 seconds=stats.seconds))

    def _checked(self, request: prefill_pb2.PrefillRequest, ids: list[int],
                 params) -> tuple[list[int], int, int, int]:
        """The destination blocks; this pool's blocks the prompt needs and those it skips; the token of the first
        sent block where the destination's first block begins (0 unless its block size differs from ours and the
        skip ends inside one of our blocks). INVALID_ARGUMENT where they disagree. Run on the loop, not queued
        behind the engine's step: it reads only the engine's fixed shape, and a request must not wait unseen (its
        leases not yet kept alive) for a step to end just to be checked. Blocks of the destination (destination
        blocks, num_skip_blocks) are counted in its block size: the transfer re-chunks into them."""
        self.engine.validate(ids, params)
        dst = list(request.destination_blocks.block_ids)
        own = self.engine.layout.block_size
        dst_size = request.destination.layout.block_size or own
        needed = -(-len(ids) // dst_size)
        skip = request.num_skip_blocks
        if not 0 <= skip < needed:
            raise errors.InvalidArgumentError(f"num_skip_blocks must lie in [0, {needed}) for a prompt of "
                                              f"{len(ids)} tokens, got {skip}")
        if len(dst) != needed - skip:
            raise errors.InvalidArgumentError(f"destination_blocks has {len(dst)} blocks; a prompt of {len(ids)} "
                                              f"tokens skipping {skip} needs {needed - skip}")
        skip_tokens = skip * dst_size
        return dst, self.engine.layout.num_blocks_for(len(ids)), skip_tokens // own, skip_tokens % own

    def _transfer_error(self, rid: str, address: str, e: TransportError) -> errors.MeshError:
        """A failed KV transfer as the error the caller sees; when the request's handoff expired here first (which
        aborted the transfer), the quiet error of late work, with the status of the expiry."""
        if self.handoffs.get(rid) is None:
            return self.handoffs.ended(rid, "the end of its KV transfer")
        return errors.MeshError.with_status(errors.status_for(e), f"KV transfer to {address} failed: {e}")


def _record_compute(submitted_ns: int, started_ns: int, num_tokens: int, num_cached: int) -> None:
    """The `prefill.queue` (submitted → the engine step completing the prompt began) and `prefill.compute` (that
    step → first token) spans, and their histograms. A prompt chunked over several steps counts its earlier
    chunks as queue time."""
    done_ns = time.time_ns()
    started_ns = min(max(started_ns, submitted_ns), done_ns)
    telemetry.record_span(names.PREFILL_QUEUE, submitted_ns, started_ns)
    telemetry.record_span(names.PREFILL_COMPUTE, started_ns, done_ns, {
        names.ATTR_PREFILL_TOKENS: num_tokens - num_cached, names.ATTR_PROMPT_TOKENS: num_tokens,
        names.ATTR_CACHED_TOKENS: num_cached})
    metrics.REQUEST_QUEUE_TIME.labels(stage="prefill").observe((started_ns - submitted_ns) / 1e9)
    metrics.REQUEST_PREFILL_TIME.observe((done_ns - started_ns) / 1e9)
