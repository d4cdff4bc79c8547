"""Peer pull for the policies that price no KV movement (they fetch whatever is cached): the decode worker whose
pool holds more of the prompt than the cache serves the prefix to the prefill worker — never one of another
layout, nor one the prefill worker cannot reach through a transport, nor when the decode worker prefills itself."""

from kvmesh.services.kv_identity import KVLayout
from kvmesh.services.scheduler.policies import RouteQuery, get_policy
from kvmesh.services.scheduler.registry import Load, Registry, Role, WorkerSpec
from kvmesh.services.scheduler.router import route

LAYOUT = KVLayout("tiny", "float32", 16, 2, 2, 8)
PROMPT = tuple(range(1, 201))


def add(registry, role, port, layout=LAYOUT, host_id="here", transports=("shm", "grpc")):
    worker = registry.register(WorkerSpec(role, f"127.0.0.1:{port}", layout=layout, host_id=host_id,
                                          transports=transports))
    registry.heartbeat(worker.worker_id, Load())
    return worker


def mesh():
    registry = Registry(lease_s=10)
    prefill = add(registry, Role.PREFILL, 1)
    holder, other = add(registry, Role.DECODE, 2), add(registry, Role.DECODE, 3)
    registry.routed(holder, 1)  # round_robin now picks `other`
    return registry, prefill, holder, other


def test_the_holder_of_more_than_the_cache_serves_the_prefix():
    registry, prefill, holder, other = mesh()
    query = RouteQuery("r", PROMPT, decode_cached_tokens={holder.worker_id: 160}, cached_tokens={LAYOUT: 64})
    plan = route(query, registry.workers(), get_policy("round_robin"), max_queue=8)
    assert plan.decode is other and plan.prefill is prefill
    assert plan.kv_source == "peer" and plan.kv_peer is holder and plan.num_cached_tokens == 160
    # the cache holding as much: fetched from the cache, as before
    query = RouteQuery("r", PROMPT, decode_cached_tokens={holder.worker_id: 160}, cached_tokens={LAYOUT: 160})
    plan = route(query, registry.workers(), get_policy("round_robin"), max_queue=8)
    assert plan.kv_peer is None and plan.kv_source == "" and plan.num_cached_tokens == 160


def test_the_chosen_decode_worker_itself_can_serve_its_prefix_to_the_prefill_worker():
    registry, prefill, holder, other = mesh()
    query = RouteQuery("r", PROMPT, decode_cached_tokens={other.worker_id: 96})  # a long tail: not prefilled there
    plan = route(query, registry.workers(), get_policy("round_robin"), max_queue=8)
    assert plan.decode is other and not plan.local_prefill and plan.kv_peer is other and plan.num_cached_tokens == 96


def test_no_pull_from_another_layout_an_unreachable_peer_or_for_a_local_prefill():
    registry, prefill, holder, other = mesh()
    wide = add(registry, Role.DECODE, 4, KVLayout("tiny", "float32", 32, 2, 2, 8))
    registry.routed(wide, 5)
    far = add(registry, Role.DECODE, 5, host_id="elsewhere", transports=("shm",))  # shm only, on another host
    registry.routed(far, 5)
    for peer in (wide, far):
        query = RouteQuery("r", PROMPT, decode_cached_tokens={peer.worker_id: 160})
        plan = route(query, registry.workers(), get_policy("round_robin"), max_queue=8)
        assert plan.kv_peer is None, peer.spec
    short = RouteQuery("r", PROMPT[:40], decode_cached_tokens={other.worker_id: 32})  # other prefills the tail
    plan = route(short, registry.workers(), get_policy("round_robin"), max_queue=8)
    assert plan.local_prefill and plan.kv_peer is None


def test_the_route_span_names_the_peer():
    from kvmesh.services.scheduler.explain import ATTR_KV_PEER, ATTR_KV_SOURCE, record_plan

    class Span:
        attributes: dict = {}

        def set_attributes(self, values):
            self.attributes.update(values)

        def set_attribute(self, key, value):
            self.attributes[key] = value

        def add_event(self, *_):
            pass

    registry, prefill, holder, other = mesh()
    query = RouteQuery("r", PROMPT, decode_cached_tokens={holder.worker_id: 160})
    span = Span()
    record_plan(span, route(query, registry.workers(), get_policy("round_robin"), max_queue=8))
    assert span.attributes[ATTR_KV_SOURCE] == "peer" and span.attributes[ATTR_KV_PEER] == holder.worker_id
