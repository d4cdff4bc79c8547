"""KV link models the scheduler fits online from the transfers its heartbeats report (the counterpart of models.py
for moving KV rather than computing it).

Two kinds of link, each seconds = fixed + bytes / GB/s over a recent window, fitted like the step models (models.py
`robust_least_squares`: non-negative least squares on relative errors, outliers dropped and the rest refitted):

- a handoff, per (sending worker, receiver address, backend); a pair with too few samples borrows the fit of its
  backend across every pair, and that backend too few the configured prior (`Links`). Which backend a pair uses
  is the one it reported last (else its sender's last, else the last seen);
- a cache fetch, per requester address and across requesters, with DRAM and SSD bytes as separate terms (one
  GB/s per tier); a tier never exercised keeps its prior.

Lookups are dictionary reads of fits made when samples arrive, so a route pays O(1) per prediction. Every table is
bounded (MAX_LINKS windows, each WINDOW samples), and fitted speeds are clipped, so a worker reporting nonsense
can spoil only its own links' figures, within bounds.
"""

from __future__ import annotations

import math
from collections import OrderedDict, deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np

from kvmesh.services.scheduler.models import robust_least_squares

WINDOW = 32  # samples per link: recent enough to follow a change of path or load
MIN_SAMPLES = 4  # fewer: the fallback speaks
MAX_LINKS = 4096  # windows per table (pairs, backends, requesters), 64 x 64 workers' pairs: the oldest goes first
MIN_GBPS, MAX_GBPS = 1e-3, 1e4
MAX_FIXED_S = 10.0
TRANSFER, FETCH = "transfer", "fetch"


@dataclass(frozen=True)
class LinkSample:
    """One reported move: bytes (of which from the cache's SSD tier), and the seconds it cost the sender."""

    num_bytes: int
    seconds: float
    num_ssd_bytes: int = 0


@dataclass(frozen=True)
class Reported:
    """A sample as a heartbeat carries it: which backend and receiver, and whether it was a cache fetch."""

    backend: str
    peer: str
    sample: LinkSample
    cache_fetch: bool = False


@dataclass(frozen=True)
class LinkFit:
    """seconds = fixed_s + bytes / (gbps · 1e9) (+ SSD bytes at ssd_gbps), and the samples behind it."""

    fixed_s: float
    gbps: float
    ssd_gbps: float = 0.0
    num_samples: int = 0
    num_outliers: int = 0
    fitted: bool = False  # from samples; False: a fallback's figures

    def seconds(self, num_bytes: float, num_ssd_bytes: float = 0.0) -> float:
        """Predicted seconds to move num_bytes (of which num_ssd_bytes come from SSD)."""
        ssd = num_ssd_bytes / (self.ssd_gbps * 1e9) if num_ssd_bytes else 0.0
        return self.fixed_s + (num_bytes - num_ssd_bytes) / (self.gbps * 1e9) + ssd


def _gbps(seconds_per_gb: float) -> float:
    return min(max(1.0 / seconds_per_gb if seconds_per_gb > 0 else MAX_GBPS, MIN_GBPS), MAX_GBPS)


def fit_link(samples: list[LinkSample], prior: LinkFit) -> LinkFit:
    """The robust fit of samples; the prior (marked unfitted) while they are fewer than MIN_SAMPLES, and for a
    term (DRAM or SSD bytes) they never exercised."""
    samples = [s for s in samples if s.seconds > 0 and math.isfinite(s.seconds)]
    if len(samples) < MIN_SAMPLES:
        return LinkFit(prior.fixed_s, prior.gbps, prior.ssd_gbps, len(samples))
    rows = np.array([(1.0, (s.num_bytes - s.num_ssd_bytes) / 1e9, s.num_ssd_bytes / 1e9) for s in samples])
    (fixed, per_gb, per_ssd_gb), num_outliers = robust_least_squares(
        rows, np.array([s.seconds for s in samples]), MIN_SAMPLES)
    gbps = _gbps(per_gb) if rows[:, 1].any() else prior.gbps
    ssd_gbps = _gbps(per_ssd_gb) if rows[:, 2].any() else prior.ssd_gbps
    return LinkFit(min(fixed, MAX_FIXED_S), gbps, ssd_gbps, len(samples), num_outliers, True)


class LinkWindow:
    """One link's recent samples and the fit over them (refitted when samples arrive)."""

    def __init__(self, prior: LinkFit, window: int = WINDOW) -> None:
        self.samples: deque[LinkSample] = deque(maxlen=window)
        self.prior = prior
        self.fit = fit_link([], prior)

    def add(self, samples: Iterable[LinkSample]) -> LinkFit:
        """Record samples; refit when there were any. Returns the fit."""
        new = list(samples)
        if new:
            self.samples.extend(new)
            self.fit = fit_link(list(self.samples), self.prior)
        return self.fit


def _put(table: OrderedDict, key, value, limit: int = MAX_LINKS) -> None:
    """Set key (most recent last), dropping the oldest entry past `limit`."""
    table[key] = value
    table.move_to_end(key)
    if len(table) > limit:
        table.popitem(last=False)


class LinkBook:
    """Every link model the scheduler holds: handoffs by (sender id, receiver address, backend) with per-backend
    fallbacks, cache fetches by requester address with a fallback across requesters."""

    def __init__(self, fixed_s: float = 0.002, transfer_gbps: float = 8.0, dram_gbps: float = 4.0,
                 ssd_gbps: float = 1.0) -> None:
        self.transfer_prior = LinkFit(fixed_s, transfer_gbps)
        self.fetch_prior = LinkFit(fixed_s, dram_gbps, ssd_gbps)
        self.pairs: OrderedDict[tuple[str, str, str], LinkWindow] = OrderedDict()
        self.backends: OrderedDict[str, LinkWindow] = OrderedDict()
        self.fetches: OrderedDict[str, LinkWindow] = OrderedDict()
        self.all_fetches = LinkWindow(self.fetch_prior)
        self._pair_backend: OrderedDict[tuple[str, str], str] = OrderedDict()  # the backend each pair used last
        self._sender_backend: OrderedDict[str, str] = OrderedDict()
        self._last_backend = ""
        self._resolved: dict[tuple[str, str], LinkFit] = {}  # transfer()'s answers until the next report

    def add(self, sender_id: str, reported: Iterable[Reported]) -> None:
        """Record the samples one worker's heartbeat carried and refit each link they touched, once."""
        self._resolved.clear()
        grouped: dict[tuple[str, str, str, bool], list[LinkSample]] = {}
        for r in reported:
            grouped.setdefault((r.backend, r.peer, r.cache_fetch), []).append(r.sample)
        for (backend, peer, cache_fetch), samples in grouped.items():
            if cache_fetch:
                self._window(self.fetches, peer, self.fetch_prior).add(samples)
                self.all_fetches.add(samples)
                continue
            self._window(self.pairs, (sender_id, peer, backend), self.transfer_prior).add(samples)
            self._window(self.backends, backend, self.transfer_prior).add(samples)
            _put(self._pair_backend, (sender_id, peer), backend)
            _put(self._sender_backend, sender_id, backend)
            self._last_backend = backend

    @staticmethod
    def _window(table: OrderedDict, key, prior: LinkFit) -> LinkWindow:
        window = table.get(key)
        if window is None:
            window = LinkWindow(prior)
        _put(table, key, window)
        return window

    def transfer(self, sender_id: str, receiver: str) -> LinkFit:
        """The handoff model from sender_id to receiver: the pair's fit, else its backend's, else the prior."""
        fit = self._resolved.get((sender_id, receiver))
        if fit is None:
            fit = self._resolved[sender_id, receiver] = self._transfer(sender_id, receiver)
            if len(self._resolved) > MAX_LINKS:  # routes naming endless pairs between two reports
                self._resolved.clear()
        return fit

    def _transfer(self, sender_id: str, receiver: str) -> LinkFit:
        backend = (self._pair_backend.get((sender_id, receiver)) or self._sender_backend.get(sender_id)
                   or self._last_backend)
        pair = self.pairs.get((sender_id, receiver, backend))
        if pair is not None and pair.fit.fitted:
            return pair.fit
        across = self.backends.get(backend)
        return across.fit if across is not None and across.fit.fitted else self.transfer_prior

    def fetch(self, requester: str) -> LinkFit:
        """The cache-fetch model into requester: its own fit, else the fit across requesters, else the prior."""
        own = self.fetches.get(requester)
        if own is not None and own.fit.fitted:
            return own.fit
        return self.all_fetches.fit

    def entries(self) -> Iterator[tuple[str, str, str, str, LinkFit]]:
        """(kind, sender id, receiver, backend, fit) of every link held, fallbacks ("" for what they span) too."""
        for (sender, receiver, backend), window in self.pairs.items():
            yield TRANSFER, sender, receiver, backend, window.fit
        for backend, window in self.backends.items():
            yield TRANSFER, "", "", backend, window.fit
        for requester, window in self.fetches.items():
            yield FETCH, "", requester, "", window.fit
        yield FETCH, "", "", "", self.all_fetches.fit
