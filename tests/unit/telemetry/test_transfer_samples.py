"""What a worker keeps of the KV transfers it sent for its heartbeats: finished sends only, their time in the
transport rather than the whole transfer, cache fetches with their SSD share, a bounded window, each sample once."""

from kvmesh.services.common.transfer_samples import TransferSamples
from kvmesh.transports.base import TransferStats
from kvmesh.v1 import scheduler_pb2


def stats(**fields) -> TransferStats:
    base = dict(backend="shm", bytes=1 << 20, blocks=4, layers=2, seconds=0.5, peer="127.0.0.1:7001",
                busy_seconds=0.002)
    base.update(fields)
    return TransferStats(**base)


def test_finished_sends_are_kept_with_their_busy_seconds_and_drained_once():
    kept = TransferSamples()
    kept.observe(stats())
    kept.observe(stats(direction="recv"))  # the receiver's side: its sender reports the link
    kept.observe(stats(error="aborted"))
    kept.observe(stats(bytes=0))
    kept.observe_fetch(stats(backend="grpc", bytes=4096), num_ssd_bytes=1024, seconds=0.01)
    load = kept.drain_into(scheduler_pb2.WorkerLoad())
    sent, fetched = load.transfers
    assert (sent.num_bytes, sent.backend, sent.peer, sent.cache_fetch) == (1 << 20, "shm", "127.0.0.1:7001", False)
    assert abs(sent.seconds - 0.002) < 1e-9  # the layers' writes and the commit, not the 0.5 s of compute between
    assert (fetched.num_ssd_bytes, fetched.cache_fetch, fetched.backend) == (1024, True, "grpc")
    assert not kept.drain_into(scheduler_pb2.WorkerLoad()).transfers  # each sample goes once


def test_the_window_is_bounded_when_no_heartbeat_drains_it():
    kept = TransferSamples(window=8)
    for _ in range(100):
        kept.observe(stats())
    assert len(kept) == 8
