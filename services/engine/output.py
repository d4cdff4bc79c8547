"""What a step hands back per request, and the stop checks that decide when a sequence ends.

Stop strings are matched on the detokenised output. Tokens that might be the start of a stop string are held
back until the text rules it out, so the ids and text a caller receives never contain a stop string.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from kvmesh.services.engine.sequence import Sequence, SequenceStatus


@dataclass
class RequestOutput:
    """New tokens of one request from one step; `finished` with a reason on its last output."""

    request_id: str
    new_token_ids: list[int]
    finished: bool
    finish_reason: str | None  # "stop", "length", "abort", or "prefill" (prefill-only requests)
    logprobs: list | None
    num_prompt_tokens: int
    num_cached_tokens: int
    # on the last output: the chained hashes of the sequence's full blocks the pool cached (prefix caching on),
    # so a caller offering them to the cache service need not hash the prompt again
    block_hashes: tuple[bytes, ...] = field(default=(), repr=False)


def eos_token_ids(config, tokenizer) -> tuple[int, ...]:
    """The model config's end-of-sequence ids plus the tokenizer's, if it names another."""
    eos = list(config.eos_token_ids)
    if getattr(tokenizer, "eos_token_id", None) is not None and tokenizer.eos_token_id not in eos:
        eos.append(tokenizer.eos_token_id)
    return tuple(eos)


class StopChecker:
    """Decides after each sampled token whether a sequence is done, and which tokens may be emitted."""

    def __init__(self, tokenizer, eos_token_ids: tuple[int, ...], max_model_len: int):
        self.tokenizer = tokenizer
        self.eos_token_ids = set(eos_token_ids)
        self.max_model_len = max_model_len

    def check(self, seq: Sequence) -> None:
        """Set a finished status on `seq` if its last token ends it (stop strings are handled in emit)."""
        p, token = seq.params, seq.token_ids[-1]
        if (token in self.eos_token_ids and not p.ignore_eos) or token in p.stop_token_ids:
            seq.status = SequenceStatus.FINISHED_STOPPED
        elif seq.matcher is not None and (seq.matcher.terminated or token in self.eos_token_ids):
            seq.status = SequenceStatus.FINISHED_STOPPED  # a complete structured output ends, ignore_eos or not
        elif seq.num_output_tokens >= p.max_tokens or seq.num_tokens >= self.max_model_len:
            seq.status = SequenceStatus.FINISHED_LENGTH
        if p.stop:
            self._check_stop_strings(seq)

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def _check_stop_strings(self, seq: Sequence) -> None:
        out = seq.output_token_ids
        text = self._decode(out)
        hits = [i for i in (text.find(s) for s in seq.params.stop) if i >= 0]
        if hits:
            keep = self._tokens_within(out, min(hits))
            del seq.token_ids[seq.num_prompt_tokens + keep:]
            seq.logprobs = seq.logprobs[:keep]
            seq.status = SequenceStatus.FINISHED_STOPPED
            return
        if not seq.status.finished and seq.status is not SequenceStatus.PREFILLED:
            held = max((k for s in seq.params.stop for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
            seq.num_safe = self._tokens_within(out, len(text) - held) if held else len(out)
        else:
            seq.num_safe = len(out)

    def _tokens_within(self, ids: list[int], num_chars: int) -> int:
        """The most leading tokens whose text fits in `num_chars` characters."""
        k = len(ids)
        while k > 0 and len(self._decode(ids[:k])) > num_chars:
            k -= 1
        return k

    def emit(self, seq: Sequence, reason: str | None = None) -> RequestOutput | None:
        """The tokens of `seq` not yet handed out (None when there is nothing to say)."""
        finished = seq.status.finished or seq.status is SequenceStatus.PREFILLED
        limit = seq.num_output_tokens if finished or not seq.params.stop else seq.num_safe
        start = seq.num_emitted
        if limit <= start and not finished:
            return None
        seq.num_emitted = max(start, limit)
        if finished:
            reason = reason or ("prefill" if seq.status is SequenceStatus.PREFILLED else seq.status.value)
        logprobs = seq.logprobs[start:limit] if seq.params.logprobs is not None else None
        return RequestOutput(seq.request_id, seq.output_token_ids[start:limit], finished,
                             reason if finished else None, logprobs, seq.num_prompt_tokens, seq.num_cached_tokens,
                             tuple(seq.block_hashes) if finished else ())
