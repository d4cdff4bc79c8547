"""`--kv-pool local`: the pool in the engine's own memory, and no backend offered that needs its own (shm)."""

import pytest

from kvmesh.services.common.config import ConfigError, from_args
from kvmesh.services.decode.config import DecodeConfig
from kvmesh.services.engine.kv_cache import KVCache
from kvmesh.services.kv_identity import KVLayout
from kvmesh.transports import LOCAL_POOL, available_backends, kv_pools, pool_backends


def test_pool_kinds_come_from_the_registry():
    assert kv_pools() == ("shm", LOCAL_POOL)
    assert pool_backends(["shm", "ucx", "grpc"], LOCAL_POOL) == ["ucx", "grpc"]
    assert pool_backends(["shm", "grpc"], "shm") == ["shm", "grpc"]


def test_local_pool_offers_no_shared_memory_backend():
    config = from_args(DecodeConfig, "decode", {"model": "m", "kv_pool": "local"}, env={})
    assert "shm" not in config.backends() and config.backends() == [b for b in available_backends() if b != "shm"]
    assert "shm" in from_args(DecodeConfig, "decode", {"model": "m"}, env={}).backends()


def test_local_pool_with_shm_forced_is_refused_with_the_way_out():
    with pytest.raises(ConfigError, match="--transport shm needs the KV pool in its own memory.*grpc"):
        from_args(DecodeConfig, "decode", {"model": "m", "kv_pool": "local", "transport": "shm"}, env={})
    with pytest.raises(ConfigError, match="not one of"):
        from_args(DecodeConfig, "decode", {"model": "m", "kv_pool": "gpu"}, env={})


def test_kv_cache_allocates_its_own_pool_whose_bytes_the_transports_see():
    kv = KVCache(KVLayout("m", "float32", 4, 2, 2, 8), 10)
    view = kv.byte_view()
    assert view.shape == (2, 2, 10, 4 * 2 * 8 * 4)
    view[1, 0, 3] = 7  # a transport landing bytes lands them in the engine's pool
    assert (kv.export_blocks([3])[1, 0, 0] == 7).all()


def test_a_local_pool_off_the_cpu_is_refused_at_start_naming_why():
    from kvmesh.services.worker.startup import local_region

    config = from_args(DecodeConfig, "decode", {"model": "m", "kv_pool": "local", "device": "meta"}, env={})
    kv = KVCache(KVLayout("m", "float32", 4, 2, 2, 8), 10, device="meta")  # device memory, as on cuda
    with pytest.raises(ConfigError, match="--kv-pool local on meta: the KV transports move host memory only"):
        local_region(kv, config, config.backends())
    region = local_region(KVCache(KVLayout("m", "float32", 4, 2, 2, 8), 10), config, config.backends())
    assert region.backend == "local" and region.name == "" and region.array.shape == (2, 2, 10, 256)
