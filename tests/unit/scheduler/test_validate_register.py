"""Register and Heartbeat claims are validated before the registry sees them: a negative load, an address nobody
can dial or a layout of no real pool gets INVALID_ARGUMENT naming the field, and the worker is not registered."""

import grpc
import pytest

from kvmesh.services.common.errors import InvalidArgumentError
from kvmesh.services.scheduler.validate_register import validate_register
from kvmesh.v1 import common_pb2, scheduler_pb2

from test_servicer import DECODE, beat, layout, register, run_with_scheduler, status_of


def request(**changes) -> scheduler_pb2.RegisterRequest:
    msg = scheduler_pb2.RegisterRequest(
        role=DECODE, address="127.0.0.1:7001", host_id="h", instance_id="i", transports=["grpc"], layout=layout(),
        descriptor=common_pb2.TransportDescriptor(backends=["grpc"], address="127.0.0.1:7001", layout=layout(),
                                                  num_blocks=64),
        load=scheduler_pb2.WorkerLoad(num_free_blocks=64, num_total_blocks=64))
    for path, value in changes.items():
        target, *rest = path.split("__")
        if rest:
            setattr(getattr(msg, target), rest[0], value)
        else:
            setattr(msg, target, value) if not isinstance(value, list) else getattr(msg, target).extend(value)
    return msg


def test_a_real_workers_request_passes():
    validate_register(request())
    validate_register(request(address="[::1]:50051"))
    validate_register(request(address="decode-0.kvmesh.svc:50051"))


@pytest.mark.parametrize("changes, words", [
    ({"load__num_waiting": -5}, "load.num_waiting"),
    ({"load__num_running": -1}, "load.num_running"),
    ({"load__num_free_blocks": 1000}, "num_free_blocks"),
    ({"address": "not an address"}, "address"),
    ({"address": "127.0.0.1:0"}, "address"),
    ({"address": "127.0.0.1:99999"}, "address"),
    ({"address": "[zz::1]:80"}, "IPv6"),
    ({"layout__block_size": 0}, "layout.block_size"),
    ({"layout__head_dim": -8}, "layout.head_dim"),
    ({"layout__dtype": "int4"}, "layout.dtype"),
    ({"layout__model_id": ""}, "layout.model_id"),
    ({"descriptor__address": "nowhere"}, "descriptor.address"),
    ({"descriptor__num_blocks": -1}, "descriptor.num_blocks"),
    ({"transports": ["GRPC; rm -rf"]}, "transports"),
    ({"instance_id": "x" * 1000}, "instance_id"),
])
def test_insane_claims_are_refused_naming_the_field(changes, words):
    with pytest.raises(InvalidArgumentError, match=words.replace(".", r"\.")):
        validate_register(request(**changes))


def test_a_fake_worker_with_a_negative_load_is_not_registered():
    async def body(stub):
        bad = request(load__num_waiting=-1000)
        assert await status_of(stub.Register(bad, timeout=2)) == grpc.StatusCode.INVALID_ARGUMENT
        assert not (await stub.ListWorkers(scheduler_pb2.ListWorkersRequest(), timeout=2)).workers
        worker_id = await register(stub, DECODE, 7001)
        negative = beat(worker_id, load=scheduler_pb2.WorkerLoad(num_running=-3))
        assert await status_of(stub.Heartbeat(negative, timeout=2)) == grpc.StatusCode.INVALID_ARGUMENT
        workers = (await stub.ListWorkers(scheduler_pb2.ListWorkersRequest(), timeout=2)).workers
        assert [w.load.num_running for w in workers] == [0]

    run_with_scheduler(body)


def transfer(**fields) -> scheduler_pb2.TransferSample:
    sample = dict(num_bytes=1 << 20, seconds=0.001, backend="shm", peer="127.0.0.1:7001")
    sample.update(fields)
    return scheduler_pb2.TransferSample(**sample)


@pytest.mark.parametrize("sample, words", [
    (transfer(num_bytes=-1), "num_bytes"),
    (transfer(num_bytes=1 << 50), "num_bytes"),
    (transfer(num_ssd_bytes=2 << 20), "num_ssd_bytes"),
    (transfer(seconds=float("nan")), "seconds"),
    (transfer(seconds=float("inf")), "seconds"),
    (transfer(seconds=-0.5), "seconds"),
    (transfer(backend="SHM; drop"), "backend"),
    (transfer(peer="x" * 1000), "peer"),
])
def test_insane_transfer_samples_are_refused_naming_the_field(sample, words):
    msg = request()
    msg.load.transfers.append(sample)
    with pytest.raises(InvalidArgumentError, match=r"load\.transfers\[0\].*" + words):
        validate_register(msg)


def test_a_heartbeat_with_too_many_or_poisoned_transfer_samples_leaves_the_link_models_alone():
    async def body(stub):
        prefill = await register(stub, scheduler_pb2.WORKER_ROLE_PREFILL, 7002)
        flood = scheduler_pb2.WorkerLoad(transfers=[transfer()] * 1000)
        assert await status_of(stub.Heartbeat(beat(prefill, load=flood), timeout=2)) == grpc.StatusCode.INVALID_ARGUMENT
        poisoned = scheduler_pb2.WorkerLoad(transfers=[transfer()] * 8 + [transfer(seconds=float("nan"))])
        assert await status_of(stub.Heartbeat(beat(prefill, load=poisoned), timeout=2)) == \
            grpc.StatusCode.INVALID_ARGUMENT
        stats = await stub.Stats(scheduler_pb2.SchedulerStatsRequest(), timeout=2)
        assert not [link for link in stats.links if link.sender_id == prefill]  # nothing of either was taken
        # a sane report is taken: 8 samples of 1 MiB in 1 ms (1 GB/s with a fixed cost split off)
        sizes = [(i + 1) << 20 for i in range(8)]
        sane = scheduler_pb2.WorkerLoad(transfers=[transfer(num_bytes=n, seconds=0.001 + n / 1e9) for n in sizes])
        await stub.Heartbeat(beat(prefill, load=sane), timeout=2)
        stats = await stub.Stats(scheduler_pb2.SchedulerStatsRequest(), timeout=2)
        link = next(link for link in stats.links if link.sender_id == prefill)
        assert (link.kind, link.receiver, link.backend, link.num_samples) == ("transfer", "127.0.0.1:7001", "shm", 8)
        assert link.fitted and link.gbps == pytest.approx(1.0, rel=0.05)
        assert link.fixed_seconds == pytest.approx(0.001, rel=0.05)

    run_with_scheduler(body)
