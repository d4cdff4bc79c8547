"""Which prefill workers can hand their KV to which decode workers: only pairs with a transport backend both
offer and can use between their hosts (a same-host-only backend only when their host ids are equal) — the rule
the sender negotiates by (`kvmesh.transports.usable_backends`), applied before a route is made, so no request is
sent to a pair whose transfer must fail. A worker that registered no backends is taken to pair with any."""

from __future__ import annotations

import functools
from collections.abc import Sequence

from kvmesh.services.common.errors import UnavailableError
from kvmesh.services.scheduler.registry import Worker
from kvmesh.services.scheduler.route_types import Candidates
from kvmesh.transports import registered_backends, same_host_only, usable_backends


@functools.lru_cache(maxsize=4096)
def _link(receiver: tuple[str, ...], sender: tuple[str, ...]) -> tuple[bool, bool]:
    """(usable between hosts, usable on one host) for a receiver and a sender offering these backends."""
    if not receiver or not sender:  # it did not say: no constraint known
        return True, True
    return bool(usable_backends(receiver, sender, False)), bool(usable_backends(receiver, sender, True))


def pairs(prefill: Worker, decode: Worker) -> bool:
    """Whether prefill can write KV into decode through some backend."""
    return _pairs((prefill.spec.host_id, prefill.spec.transports), (decode.spec.host_id, decode.spec.transports))


def _pairs(sender: tuple[str, tuple[str, ...]], receiver: tuple[str, tuple[str, ...]]) -> bool:
    across, local = _link(receiver[1], sender[1])
    return across or (local and sender[0] == receiver[0])


def split(group: Candidates) -> list[Candidates]:
    """The group as groups in which every prefill worker pairs with every decode worker (a decode worker with no
    prefill worker to pair with is left out). One group unchanged when every backend set pairs across hosts (the
    usual mesh); else decided per (host, backends) profile: O(P + D + profiles^2), never per pair of workers."""
    if not group.prefill:  # colocated: no transfer
        return [group]
    senders: dict[tuple, list[Worker]] = {}
    for prefill in group.prefill:
        senders.setdefault((prefill.spec.host_id, prefill.spec.transports), []).append(prefill)
    receivers: dict[tuple, list[Worker]] = {}
    for decode in group.decode:
        receivers.setdefault((decode.spec.host_id, decode.spec.transports), []).append(decode)
    if all(_link(r[1], s[1])[0] for r in receivers for s in senders):
        return [group]
    by_senders: dict[tuple, list[Worker]] = {}
    for receiver, decodes in receivers.items():
        usable = tuple(s for s in senders if _pairs(s, receiver))
        if usable:
            by_senders.setdefault(usable, []).extend(decodes)
    return [Candidates(group.layout, tuple(p for s in usable for p in senders[s]), tuple(decodes))
            for usable, decodes in by_senders.items()]


def unpaired(groups: Sequence[Candidates]) -> UnavailableError:
    """Why no prefill worker can hand KV to any decode worker: the backends each side offers, by host."""
    def offered(workers) -> str:
        return "; ".join(sorted({f"{','.join(w.spec.transports) or 'none'} on host {w.spec.host_id or '?'}"
                                 for w in workers}))
    prefill = [p for g in groups for p in g.prefill]
    decode = [d for g in groups for d in g.decode]
    local = ", ".join(b for b in registered_backends() if same_host_only(b))
    return UnavailableError(f"no prefill and decode worker pair shares a transport backend usable between their "
                            f"hosts (same-host only: {local}): prefill workers offer {offered(prefill)}; decode "
                            f"workers offer {offered(decode)}. Start workers with a common --transport (e.g. on "
                            f"every host one that crosses hosts)")
