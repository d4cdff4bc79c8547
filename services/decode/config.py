"""The decode worker's settings."""

from __future__ import annotations

from dataclasses import dataclass

from kvmesh.services.common.config import check, knob
from kvmesh.services.worker.config import WorkerConfig

DEFAULT_PORT = 50080
KV_LOAD_FAILURE_POLICIES = ("fail", "recompute")
SPECULATIVE_METHODS = ("none", "ngram")
KV_SPILL_TARGETS = ("none", "cache")


@dataclass(frozen=True)
class DecodeConfig(WorkerConfig):
    """Settings of `kvmesh decode`."""

    port: int = knob(DEFAULT_PORT, "Port to bind; 0 picks a free one (printed at start).")
    queue_timeout_s: float = knob(30.0, "Seconds a request may wait for free KV blocks before RESOURCE_EXHAUSTED.")
    prefill_timeout_s: float = knob(120.0, "Deadline of the call to the prefill worker, capped by the client's.")
    prefix_caching: bool = knob(True, "Keep finished requests' full KV blocks in the pool, findable by their "
                                      "chained hash (evicted LRU only when no block is free), and share a prompt's "
                                      "cached leading blocks instead of having them prefilled and sent again.")
    local_prefill_max_tokens: int = knob(16, "When the pool holds every full block of a prompt but its tail, "
                                             "prefill a tail of at most this many tokens here (no prefill worker, "
                                             "no transfer); 0: never.")
    cache_decode_kv: bool = knob(False, "When a request finishes, offer the cache service the full KV blocks its "
                                        "decode completed (the reply), so the next turn of a conversation reuses "
                                        "them on any worker instead of recomputing the reply; costs those blocks' "
                                        "bytes over gRPC per request. Needs prefix_caching.")
    colocated: bool = knob(False, "Prefill every prompt here, in chunks of at most max_num_batched_tokens mixed "
                                  "into the continuous batch beside the running decodes, and register so: the "
                                  "scheduler routes here without a prefill worker (the colocated baseline a "
                                  "disaggregated mesh is measured against; `kvmesh up --colocated`).")
    kv_load_failure: str = knob("fail", "What a failed or corrupt KV transfer does to its request: fail (the "
                                        "transfer's status, DATA_LOSS for a bad checksum; the gateway may retry it "
                                        "on another pair) or recompute (prefill the prompt here instead; the client "
                                        "sees only latency). As vLLM's --kv-load-failure-policy.",
                                 choices=KV_LOAD_FAILURE_POLICIES)
    kv_spill: str = knob("none", "What the engine does when a running sequence needs a KV block and none is free: "
                                 "none preempts the newest sequence (its blocks freed, recomputed later from its "
                                 "tokens); cache spills a victim's oldest blocks to the cache service and pages "
                                 "them back through the KV transports when blocks free up (no recomputation; a "
                                 "page-back that fails recomputes). The cache is `cache`, or the scheduler's.",
                         choices=KV_SPILL_TARGETS)
    transport_check_s: float = knob(10.0, "Seconds between re-checks of the transports while serving: one real block "
                                          "moved through each backend into the pool (two free blocks borrowed); a "
                                          "failure turns the worker NOT_SERVING and takes it out of every scheduler "
                                          "until a check passes again. 0: checked at start only.")
    kv_events_max_hashes: int = knob(4096, "Most block hashes in one heartbeat's KV events to the scheduler; more "
                                           "changes than that send a full resync of the most recent ones instead.")
    speculative: str = knob("none", "Speculative decoding of greedy requests (temperature 0, no penalties or "
                                    "logit_bias): ngram drafts tokens by looking the context's last n-gram up "
                                    "earlier in it (prompt lookup) and verifies them in the step's one forward; the "
                                    "output is token for token plain greedy's. none: off.",
                            choices=SPECULATIVE_METHODS)
    num_speculative_tokens: int = knob(4, "Draft tokens verified per sequence and step at most (K).")
    ngram_min: int = knob(2, "Shortest context suffix looked up for a draft (vLLM's prompt_lookup_min).")
    ngram_max: int = knob(5, "Longest context suffix looked up, tried first (vLLM's prompt_lookup_max).")

    def validate(self) -> None:
        super().validate()
        check(self.queue_timeout_s >= 0, f"queue_timeout_s must be >= 0, got {self.queue_timeout_s}")
        check(self.prefill_timeout_s > 0, f"prefill_timeout_s must be > 0, got {self.prefill_timeout_s}")
        check(self.local_prefill_max_tokens >= 0,
              f"local_prefill_max_tokens must be >= 0, got {self.local_prefill_max_tokens}")
        check(self.prefix_caching or not self.cache_decode_kv,
              "cache_decode_kv needs prefix_caching: finished requests' blocks must stay findable until sent")
        check(self.kv_load_failure in KV_LOAD_FAILURE_POLICIES,
              f"kv_load_failure must be one of {', '.join(KV_LOAD_FAILURE_POLICIES)}, got {self.kv_load_failure!r}")
        check(self.kv_spill in KV_SPILL_TARGETS,
              f"kv_spill must be one of {', '.join(KV_SPILL_TARGETS)}, got {self.kv_spill!r}")
        check(self.kv_spill == "none" or self.cache != "none", "kv_spill cache needs a cache service; cache is none")
        check(self.speculative in SPECULATIVE_METHODS,
              f"speculative must be one of {', '.join(SPECULATIVE_METHODS)}, got {self.speculative!r}")
        check(1 <= self.num_speculative_tokens <= 64,
              f"num_speculative_tokens must lie in [1, 64], got {self.num_speculative_tokens}")
        check(1 <= self.ngram_min <= self.ngram_max,
              f"need 1 <= ngram_min <= ngram_max, got ngram_min={self.ngram_min}, ngram_max={self.ngram_max}")
        check(self.transport_check_s >= 0, f"transport_check_s must be >= 0, got {self.transport_check_s}")
        check(self.kv_events_max_hashes >= 1, f"kv_events_max_hashes must be >= 1, got {self.kv_events_max_hashes}")
