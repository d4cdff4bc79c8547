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
