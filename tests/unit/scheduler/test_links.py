"""The scheduler's KV link models: a known fixed cost and GB/s recovered from noisy samples with outliers, the
cache's two tiers apart, priors before samples, a pair without samples borrowing its backend's fit, bounded tables,
and slo_aware's predictions taking the pair's own link."""

import math
import random

import pytest

from kvmesh.services.scheduler import explain
from kvmesh.services.scheduler.links import (MAX_GBPS, MAX_LINKS, MIN_SAMPLES, WINDOW, LinkBook, LinkFit,
                                             LinkSample, Reported, fit_link)
from kvmesh.services.scheduler.policies import Links, RouteQuery, slo_aware
from kvmesh.services.scheduler.predict import kv_bytes_per_token, transfer_s
from kvmesh.services.scheduler.registry import Role
from kvmesh.services.scheduler.router import route

from test_slo_aware import LAYOUT, PROMPT, add, Registry

PRIOR = LinkFit(0.002, 8.0)


def noisy(rng, count, fixed_s=0.003, gbps=2.0, ssd_gbps=0.0):
    """Transfers of 64 KiB .. 64 MiB at fixed_s + bytes / gbps (and some from SSD at ssd_gbps), +-3 % noise."""
    samples = []
    for _ in range(count):
        nbytes = rng.randrange(1 << 16, 1 << 26)
        ssd = rng.randrange(0, nbytes) if ssd_gbps else 0
        seconds = fixed_s + (nbytes - ssd) / (gbps * 1e9) + (ssd / (ssd_gbps * 1e9) if ssd else 0.0)
        samples.append(LinkSample(nbytes, seconds * rng.uniform(0.97, 1.03), ssd))
    return samples


def test_the_fit_recovers_a_known_fixed_cost_and_speed_despite_outliers():
    samples = noisy(random.Random(1), WINDOW)
    for i in range(0, WINDOW, 8):  # a stalled transfer (a retransmit, a descheduled sender) in every eighth: 30x
        samples[i] = LinkSample(samples[i].num_bytes, samples[i].seconds * 30)
    fit = fit_link(samples, PRIOR)
    assert fit.fitted and fit.num_samples == WINDOW and fit.num_outliers >= WINDOW // 8
    assert fit.gbps == pytest.approx(2.0, rel=0.05)
    assert fit.fixed_s == pytest.approx(0.003, rel=0.2)


def test_the_cache_fetch_fit_tells_dram_from_ssd():
    fit = fit_link(noisy(random.Random(2), WINDOW, fixed_s=0.001, gbps=4.0, ssd_gbps=0.5), LinkFit(0.002, 4, 1))
    assert fit.gbps == pytest.approx(4.0, rel=0.1) and fit.ssd_gbps == pytest.approx(0.5, rel=0.1)
    # a requester only ever served from DRAM keeps the SSD prior
    dram_only = fit_link(noisy(random.Random(3), 16, gbps=4.0), LinkFit(0.002, 4, 1))
    assert dram_only.fitted and dram_only.ssd_gbps == 1


def test_priors_answer_until_enough_samples_and_nonsense_is_clipped():
    few = fit_link(noisy(random.Random(4), MIN_SAMPLES - 1), PRIOR)
    assert not few.fitted and (few.fixed_s, few.gbps, few.num_samples) == (0.002, 8.0, MIN_SAMPLES - 1)
    # a worker claiming its transfers take no time at any size cannot claim an infinite speed
    instant = fit_link([LinkSample(1 << 30, 1e-9)] * 8, PRIOR)
    assert math.isfinite(instant.gbps) and instant.gbps <= MAX_GBPS


def reported(rng, peer, backend="shm", count=16, gbps=2.0):
    return [Reported(backend, peer, s) for s in noisy(rng, count, gbps=gbps)]


def test_a_pair_without_samples_borrows_its_backends_fit_then_the_prior():
    book = LinkBook(fixed_s=0.002, transfer_gbps=8.0)
    assert book.transfer("prefill-a", "127.0.0.1:2") == book.transfer_prior  # nothing reported yet
    rng = random.Random(5)
    book.add("prefill-a", reported(rng, "127.0.0.1:2", gbps=1.0))
    book.add("prefill-b", reported(rng, "127.0.0.1:3", gbps=3.0))
    assert book.transfer("prefill-a", "127.0.0.1:2").gbps == pytest.approx(1.0, rel=0.05)
    assert book.transfer("prefill-b", "127.0.0.1:3").gbps == pytest.approx(3.0, rel=0.05)
    across = book.transfer("prefill-a", "127.0.0.1:3")  # a pair never measured: the shm fit across pairs
    assert across is book.backends["shm"].fit and across.num_samples == 32 and 1.0 < across.gbps < 3.0
    # too few samples on the pair itself: still the backend's fit
    book.add("prefill-c", reported(rng, "127.0.0.1:2", count=MIN_SAMPLES - 1, gbps=0.1))
    assert book.transfer("prefill-c", "127.0.0.1:2") is book.backends["shm"].fit
    assert book.fetch("127.0.0.1:9") == book.all_fetches.fit and not book.fetch("127.0.0.1:9").fitted


def test_the_book_stays_bounded_whatever_peers_a_worker_names():
    book = LinkBook()
    rng = random.Random(6)
    for i in range(MAX_LINKS + 50):
        book.add("prefill-a", [Reported("grpc", f"10.0.0.{i}:1", LinkSample(rng.randrange(1, 1 << 20), 0.01))])
    assert len(book.pairs) == MAX_LINKS and len(book._pair_backend) == MAX_LINKS
    assert all(len(w.samples) <= WINDOW for w in book.pairs.values())


def test_slo_aware_prices_each_pairs_handoff_by_its_own_link_and_says_which():
    registry = Registry(lease_s=10)
    prefill = add(registry, Role.PREFILL, 1)
    slow = add(registry, Role.DECODE, 2)
    fast = add(registry, Role.DECODE, 3)
    book = LinkBook()
    rng = random.Random(7)
    book.add(prefill.worker_id, reported(rng, slow.spec.address, gbps=0.01))  # 10 MB/s: 8 MB of KV take 0.8 s
    book.add(prefill.worker_id, reported(rng, fast.spec.address, gbps=5.0))
    links = Links(book=book)
    nbytes = len(PROMPT) * kv_bytes_per_token(LAYOUT)
    assert transfer_s(links, LAYOUT, len(PROMPT), prefill, slow) == pytest.approx(nbytes / 1e7, rel=0.1)
    assert transfer_s(Links(), LAYOUT, len(PROMPT), prefill, slow) == pytest.approx(0.002 + nbytes / 8e9)
    plan = route(RouteQuery("r", PROMPT, links=links), registry.workers(), slo_aware, max_queue=8)
    assert plan.decode.worker_id == fast.worker_id and "handoff fitted 5" in plan.why
    model = next(m for m in explain.links_of(book, registry) if m.receiver == slow.spec.address)
    assert model.fitted and model.sender_id == prefill.worker_id and model.gbps == pytest.approx(0.01, rel=0.1)


def test_the_link_gauge_shows_live_senders_links_and_drops_a_departed_senders():
    from kvmesh.services.common import metrics

    registry = Registry(lease_s=10)
    prefill = add(registry, Role.PREFILL, 1)
    book = LinkBook()
    book.add(prefill.worker_id, reported(random.Random(8), "127.0.0.1:2", gbps=2.0))
    book.add("prefill-gone", reported(random.Random(9), "127.0.0.1:2"))
    explain.observe_links(book, registry)
    labels = ("transfer", prefill.worker_id, "127.0.0.1:2", "shm", "gbps")
    assert metrics.SCHEDULER_LINK_MODEL.labels(*labels)._value.get() == pytest.approx(2.0, rel=0.05)
    senders = {s.labels["sender_id"] for m in metrics.SCHEDULER_LINK_MODEL.collect() for s in m.samples}
    assert senders == {prefill.worker_id, ""}  # the departed sender's series went; the fits across senders stay
