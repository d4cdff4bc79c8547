"""The worker side of the scheduler's registry: register, heartbeat with load figures, register again when the
scheduler forgets us (lease lapsed, scheduler restarted), deregister on a clean stop.

    client = RegistrationClient("127.0.0.1:50050", make_register_request, current_load, channels=server.channels)
    client.attach(server)   # runs while the server runs, deregisters at stop
"""

from __future__ import annotations

import asyncio
import inspect
import itertools
import logging
import socket
from collections.abc import Awaitable, Callable

import grpc

from kvmesh.services.common.channels import ChannelCache
from kvmesh.services.common.kv_fanout import KVEventsFanout
from kvmesh.v1 import scheduler_pb2, scheduler_pb2_grpc

log = logging.getLogger(__name__)

MAX_RETRY_S = 5.0
#: Most request ids one heartbeat reports as arrived, and the longest id it reports: past either, the heartbeat
#: says it does not report arrivals (its load is then taken to count every route made before it).
MAX_ARRIVALS = 65536
MAX_ARRIVED_ID_CHARS = 1024

LoadFn = Callable[[], "scheduler_pb2.WorkerLoad | Awaitable[scheduler_pb2.WorkerLoad]"]
KVEventsFn = Callable[[bool], Awaitable[scheduler_pb2.KVEvents]]


def scheduler_addresses(value: str | list[str]) -> list[str]:
    """The addresses of a `--scheduler` value: one host:port, or several separated by commas; duplicates once."""
    parts = value.split(",") if isinstance(value, str) else list(value)
    return list(dict.fromkeys(p.strip() for p in parts if p.strip()))


def advertise_address(host: str, port: int, advertise_host: str = "") -> str:
    """The address peers should dial: advertise_host when set; the bound host unless it is a wildcard
    (0.0.0.0, ::), then this machine's fully qualified name."""
    if not advertise_host:
        advertise_host = socket.getfqdn() if host.strip("[]") in ("0.0.0.0", "::", "") else host
    return f"{advertise_host}:{port}"


class RegistrationClient:
    """Keeps one worker registered with the scheduler for as long as `run()` runs."""

    def __init__(self, scheduler_address: str, register_request: Callable[[], scheduler_pb2.RegisterRequest],
                 load: LoadFn, *, channels: ChannelCache | None = None, rpc_timeout_s: float = 2.0,
                 retry_s: float = 0.5, interval_s: float | None = None,
                 kv_events: KVEventsFn | None = None, reports_arrivals: bool = False) -> None:
        self.scheduler_address = scheduler_address
        self._register_request = register_request
        self._load = load
        self._channels = channels or ChannelCache()
        self._own_channels = channels is None
        self.rpc_timeout_s = rpc_timeout_s
        self.retry_s = retry_s
        self.interval_s = interval_s
        self.worker_id: str | None = None
        self._lease_token = ""  # Register's secret for this worker id: only we can renew or end its lease
        self.num_registrations = 0
        self.heartbeat_interval_s = interval_s or 1.0
        self.registered = asyncio.Event()
        # kv_events(full): the KV events a heartbeat carries. Deltas since the last acknowledged heartbeat, or a
        # full resync after (re)registration, a failed heartbeat, or when the scheduler asks for one.
        self._kv_events = kv_events
        self._resync = True
        # reports_arrivals: the worker calls note_arrival for each request it takes, and each heartbeat lists them
        # so the scheduler keeps counting only the routes still on their way (see HeartbeatRequest)
        self.reports_arrivals = reports_arrivals
        self._arrived: list[str] = []
        self._arrivals_lost = False
        self._wake = asyncio.Event()  # heartbeat now: someone waits for the scheduler to see the current load
        self._waiters: asyncio.Future | None = None  # done when a heartbeat begun after heartbeat_soon() ends
        self.healthy = True  # the last heartbeat was answered
        self.withdrawn = False  # out of the registry by its own choice (withdraw) until restore()
        # a flexible worker's: called with HeartbeatResponse.desired_role when the scheduler asks for another role
        self.on_desired_role: Callable[[int], None] | None = None

    @property
    def _stub(self) -> scheduler_pb2_grpc.SchedulerStub:
        return scheduler_pb2_grpc.SchedulerStub(self._channels.get(self.scheduler_address))

    async def _current_load(self) -> scheduler_pb2.WorkerLoad:
        load = self._load()
        return await load if inspect.isawaitable(load) else load

    async def register(self) -> scheduler_pb2.RegisterResponse:
        """Register once (raises grpc.aio.AioRpcError on failure); remembers the worker id and the interval."""
        request = self._register_request()
        request.load.CopyFrom(await self._current_load())
        reply = await self._stub.Register(request, timeout=self.rpc_timeout_s)
        self.worker_id, self._lease_token = reply.worker_id, reply.lease_token
        self.num_registrations += 1
        self._resync = True  # a new worker id starts with an empty index at the scheduler
        # The scheduler's advice may change when it restarts with another lease: follow it on every registration.
        self.heartbeat_interval_s = (self.interval_s or reply.heartbeat_interval_seconds
                                     or reply.lease_seconds / 3 or 1.0)
        self.registered.set()
        log.info("registered with %s as %s", self.scheduler_address, self.worker_id)
        return reply

    async def _register_until_done(self) -> None:
        """Register, retrying with backoff (retry_s doubling up to MAX_RETRY_S) until the scheduler answers."""
        delay = self.retry_s
        for attempt in itertools.count():
            try:
                await self.register()
                return
            except grpc.aio.AioRpcError as exc:
                level = logging.WARNING if attempt == 0 else logging.DEBUG
                log.log(level, "register with %s failed (%s); retrying", self.scheduler_address, exc.code().name)
                await asyncio.sleep(delay)
                delay = min(delay * 2, MAX_RETRY_S)

    def note_arrival(self, request_id: str) -> None:
        """A request reached the worker (its load shows it from now on): the next heartbeat says so."""
        if len(self._arrived) < MAX_ARRIVALS and len(request_id) <= MAX_ARRIVED_ID_CHARS:
            self._arrived.append(request_id)
        else:
            self._arrivals_lost = True

    def heartbeat_soon(self) -> asyncio.Future:
        """Ask for a heartbeat now (between the regular ones, without KV events): the future is done once one that
        began after this call has been answered or has failed (at once when not registered)."""
        if self.worker_id is None:
            done = asyncio.get_running_loop().create_future()
            done.set_result(None)
            return done
        if self._waiters is None:
            self._waiters = asyncio.get_running_loop().create_future()
            self._wake.set()
        return self._waiters

    async def heartbeat(self, with_kv_events: bool = True) -> None:
        """Send one heartbeat; on NOT_FOUND register again. Other failures raise grpc.aio.AioRpcError."""
        # the arrivals before the load: one noted in between is in the load and stays counted until the next
        arrived, lost = self._arrived, self._arrivals_lost
        self._arrived, self._arrivals_lost = [], False
        reports = self.reports_arrivals and not lost
        request = scheduler_pb2.HeartbeatRequest(worker_id=self.worker_id, lease_token=self._lease_token,
                                                 load=await self._current_load(),
                                                 reports_arrivals=reports, arrived_request_ids=arrived if reports else [])
        if self._kv_events is not None and with_kv_events:
            full, self._resync = self._resync, False
            try:  # a long engine step must not hold the heartbeat (and so the lease) back
                request.kv_events.CopyFrom(await asyncio.wait_for(self._kv_events(full), self.rpc_timeout_s))
            except asyncio.TimeoutError:
                self._resync = True  # the events may still be drained, too late to send: resync next time
        try:
            reply = await self._stub.Heartbeat(request, timeout=self.rpc_timeout_s)
            self._resync = self._resync or reply.resync_kv_events
            if reply.desired_role and self.on_desired_role is not None:
                self.on_desired_role(reply.desired_role)
        except grpc.aio.AioRpcError as exc:
            self._resync = True  # the scheduler may or may not have applied these events: start over
            if exc.code() != grpc.StatusCode.NOT_FOUND:
                self._arrived[:0], self._arrivals_lost = arrived, self._arrivals_lost or lost  # tell them next time
                raise
            if self.withdrawn:  # it left on purpose meanwhile
                return
            log.warning("scheduler forgot %s; registering again", self.worker_id)
            self.registered.clear()
            await self._register_until_done()

    async def run(self) -> None:
        """Register (retrying until the scheduler answers), then heartbeat forever (every heartbeat_interval_s with
        KV events, and whenever heartbeat_soon asks, without); cancel to stop."""
        await self._register_until_done()
        loop = asyncio.get_running_loop()
        last = loop.time()
        while True:
            wait = self.heartbeat_interval_s - (loop.time() - last)
            if wait > 0:
                try:
                    await asyncio.wait_for(self._wake.wait(), wait)
                except asyncio.TimeoutError:
                    pass
            self._wake.clear()
            regular = loop.time() - last >= self.heartbeat_interval_s
            waiters, self._waiters = self._waiters, None
            try:
                if self.withdrawn or self.worker_id is None:  # not now; or back after a withdrawal
                    if not self.withdrawn:
                        await self._register_until_done()
                    last = loop.time()
                    continue
                await self.heartbeat(with_kv_events=regular)
                self.healthy = True
            except grpc.aio.AioRpcError as exc:  # scheduler down or slow: keep trying, NOT_FOUND will follow
                self.healthy = False
                log.warning("heartbeat to %s failed: %s", self.scheduler_address, exc.code().name)
            finally:
                if waiters is not None and not waiters.done():
                    waiters.set_result(None)
            if regular:
                last = loop.time()

    async def withdraw(self) -> None:
        """Leave the registry and stop heartbeating until restore(): a worker that cannot serve for now."""
        self.withdrawn = True
        worker_id, self.worker_id = self.worker_id, None
        self.registered.clear()
        if worker_id:
            await self._leave(worker_id)  # on failure it lapses with its lease instead

    def restore(self) -> None:
        """Register again (in the heartbeat loop) after withdraw()."""
        self.withdrawn = False
        self._wake.set()

    async def deregister(self) -> None:
        """Leave the registry (best effort, bounded by rpc_timeout_s); close our channel if we opened it."""
        worker_id, self.worker_id = self.worker_id, None
        self.registered.clear()
        try:
            if worker_id:
                await self._leave(worker_id)
        finally:
            if self._own_channels:
                await self._channels.close()

    async def _leave(self, worker_id: str) -> None:
        """Deregister worker_id (with its lease token), bounded by rpc_timeout_s; a failure is logged."""
        request = scheduler_pb2.DeregisterRequest(worker_id=worker_id, lease_token=self._lease_token)
        try:
            await self._stub.Deregister(request, timeout=self.rpc_timeout_s)
        except grpc.aio.AioRpcError as exc:
            log.warning("deregister from %s failed: %s", self.scheduler_address, exc.code().name)

    def attach(self, server) -> None:
        """Run on `server` (a MeshServer): start with it, deregister when it stops."""
        async def keep_registered(_server) -> None:
            await self.run()

        server.add_task(keep_registered)
        server.on_stop(self.deregister)


async def heartbeat_everywhere(clients: list[RegistrationClient], timeout_s: float) -> None:
    """Heartbeat every scheduler now and wait (at most timeout_s) until each has seen the current load; a scheduler
    whose last heartbeat failed is not waited for."""
    waiting = [c.heartbeat_soon() for c in clients if c.healthy]
    if waiting:
        await asyncio.wait(waiting, timeout=timeout_s)


def register_everywhere(server, schedulers: list[str], register_request: Callable[[], scheduler_pb2.RegisterRequest],
                        load: LoadFn, kv_events: KVEventsFn | None = None,
                        kv_events_max_hashes: int = 4096, reports_arrivals: bool = False) -> list[RegistrationClient]:
    """Keep this worker registered with every scheduler (their state is soft: each rebuilds it from heartbeats,
    so any of them can route), for as long as `server` runs; each scheduler's heartbeats get every KV event."""
    fanout = KVEventsFanout(kv_events, kv_events_max_hashes) if kv_events is not None and len(schedulers) > 1 else None
    clients = []
    for address in schedulers:
        events = fanout.subscriber() if fanout is not None else kv_events
        client = RegistrationClient(address, register_request, load, channels=server.channels, kv_events=events,
                                    reports_arrivals=reports_arrivals)
        client.attach(server)
        clients.append(client)
    return clients
