"""Structured output: a request's constraint (a JSON schema, any JSON object, a regex, a choice of strings, an EBNF
grammar) compiled by xgrammar into a grammar, and a matcher per sequence that masks the tokens that cannot come
next. xgrammar was picked over outlines-core by measurement (bench/structured.py, bench/RESULTS.md): it compiles
5-20x faster, costs less per token, and honours numeric ranges that outlines-core's regexes drop.

Rules: end-of-sequence is allowed only where the text is complete; a sequence whose matcher has terminated ends
with finish_reason "stop" (ignore_eos or not); a state that allows no token at all (none is known to occur) allows
end-of-sequence, so the sequence ends cleanly with "stop" rather than sampling from nothing. xgrammar is optional
(README: on a CPU host installed without triton, which it declares and a CPU never loads); without it a constrained request is refused, naming the extra.
Compiling is the slow part (milliseconds to seconds): callers compile off their event loop and engine thread
(`Grammars.compile` is thread-safe and caches per process); a sequence's matcher then costs microseconds.
"""

from __future__ import annotations

import json
import re
import threading
from collections import OrderedDict
from dataclasses import dataclass

import torch

from kvmesh.services.engine.errors import InvalidRequestError

KINDS = ("json_schema", "json_object", "regex", "choice", "grammar")
MISSING_EXTRA = ("structured output needs xgrammar, which this worker lacks: on a CPU host `pip install --no-deps "
                 "xgrammar==0.2.9 'apache-tvm-ffi>=0.1.11'`, on a GPU host kvmesh's `structured` extra "
                 "(pip install 'kvmesh[structured]')")
_XGR_PREFIX = re.compile(r"^\[[\d:]+\] \S+?:\d+: (Check failed: \(.*?\) is false: )?")


@dataclass(frozen=True)
class Constraint:
    """What one request's output must match. `spec`: the schema (JSON text), the regex, the grammar, or for a
    choice the JSON list of strings; empty for json_object. `num_resumed`: trailing prompt tokens already generated
    under it (a migrated continuation), which the matcher is advanced over first."""

    kind: str
    spec: str = ""
    num_resumed: int = 0

    @property
    def key(self) -> tuple[str, str]:
        return self.kind, self.spec

    @classmethod
    def of(cls, kind: str, value, num_resumed: int = 0) -> "Constraint":
        """From a message's oneof: kind, and its value (text, a list of choices, or a flag for json_object)."""
        spec = json.dumps(list(value)) if kind == "choice" else value if isinstance(value, str) else ""
        return cls(kind, spec, num_resumed)


def xgrammar_available() -> bool:
    try:
        import xgrammar  # noqa: F401
    except ImportError:
        return False
    return True


def library_reason(error: BaseException) -> str:
    """xgrammar's message without its timestamp and C++ source location: the first line a person can act on."""
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return _XGR_PREFIX.sub("", text).strip()


def _choice_grammar(spec: str) -> str:
    choices = json.loads(spec)
    if not choices or not all(isinstance(c, str) and c for c in choices):
        raise InvalidRequestError("choice must be a non-empty list of non-empty strings")
    return "root ::= " + " | ".join(json.dumps(c, ensure_ascii=False) for c in choices)


class Grammars:
    """Compiled grammars of one tokenizer, cached per process (least recently used out), and matchers over them.
    xgrammar is loaded on the first constrained request, so an engine without it serves everything else."""

    def __init__(self, tokenizer, vocab_size: int, stop_token_ids: tuple[int, ...], max_cached: int = 128):
        self.tokenizer, self.vocab_size, self.stop_token_ids = tokenizer, vocab_size, tuple(stop_token_ids)
        self.max_cached = max_cached
        self._xgr = self._compiler = None
        self._cache: OrderedDict[tuple[str, str], object] = OrderedDict()
        self._lock = threading.Lock()

    def _library(self):
        with self._lock:
            if self._compiler is None:
                try:
                    import xgrammar as xgr
                except ImportError:
                    raise InvalidRequestError(MISSING_EXTRA) from None
                info = xgr.TokenizerInfo.from_huggingface(self.tokenizer, vocab_size=self.vocab_size,
                                                          stop_token_ids=list(self.stop_token_ids))
                self._xgr, self._compiler = xgr, xgr.GrammarCompiler(info, max_threads=1, cache_enabled=False)
            return self._xgr, self._compiler

    def compile(self, constraint: Constraint):
        """The compiled grammar of a constraint (from the cache when seen before); InvalidRequestError with the
        library's reason when it is not valid. Slow on a miss: never call it on an event loop."""
        with self._lock:
            if constraint.key in self._cache:
                self._cache.move_to_end(constraint.key)
                return self._cache[constraint.key]
        compiled = self._compile(constraint)
        with self._lock:
            self._cache[constraint.key] = compiled
            while len(self._cache) > self.max_cached:
                self._cache.popitem(last=False)
        return compiled

    def _compile(self, c: Constraint):
        _, compiler = self._library()
        try:
            if c.kind == "json_schema":
                return compiler.compile_json_schema(c.spec, any_whitespace=False, strict_mode=True)
            if c.kind == "json_object":
                return compiler.compile_json_schema('{"type": "object"}', any_whitespace=False, strict_mode=False)
            if c.kind == "regex":
                return compiler.compile_regex(c.spec)
            if c.kind == "choice":
                return compiler.compile_grammar(_choice_grammar(c.spec))
            if c.kind == "grammar":
                return compiler.compile_grammar(c.spec)
        except (RuntimeError, ValueError, TypeError) as e:
            raise InvalidRequestError(f"{c.kind} is not valid: {library_reason(e)}") from None
        raise InvalidRequestError(f"unknown structured output kind {c.kind!r}; one of {', '.join(KINDS)}")

    def matcher_for(self, params, token_ids: list[int], first_token: int | None = None) -> "Matcher | None":
        """A fresh matcher of params' constraint (None when unconstrained), advanced over the last `num_resumed` of
        token_ids; with `first_token` (a prefill worker's), InvalidRequestError unless the grammar allows it next."""
        c = params.structured
        if c is None:
            return None
        if c.num_resumed > len(token_ids):
            raise InvalidRequestError(f"num_resumed_tokens {c.num_resumed} exceeds the prompt's {len(token_ids)}")
        compiled = self.compile(c)
        matcher = Matcher(self._xgr, compiled, self.vocab_size, self.stop_token_ids)
        for token in token_ids[len(token_ids) - c.num_resumed:] if c.num_resumed else []:
            if not matcher.accept(token):
                raise InvalidRequestError(f"resumed token {token} does not continue the {c.kind} output")
        if first_token is not None:
            if not matcher.accept(first_token):
                raise InvalidRequestError(f"first token {first_token} is not allowed by the {c.kind} constraint")
            matcher.rollback(1)
        return matcher


class Matcher:
    """One sequence's place in its grammar: which tokens may come next, and advancing by the one sampled."""

    def __init__(self, xgr, compiled, vocab_size: int, stop_token_ids: tuple[int, ...]):
        self._xgr = xgr
        self._matcher = xgr.GrammarMatcher(compiled)
        self.vocab_size = vocab_size
        self.stop_token_ids = stop_token_ids

    def fill(self, bitmask: torch.Tensor, row: int) -> None:
        """Write the allowed tokens into row `row` of an int32 bitmask; a state allowing none (or a terminated
        matcher, which xgrammar refuses to fill) allows EOS, so the sequence ends cleanly."""
        if self._matcher.is_terminated():
            bitmask[row] = 0
        else:
            self._matcher.fill_next_token_bitmask(bitmask, row)
        if not bool(bitmask[row].any()) and self.stop_token_ids:
            eos = self.stop_token_ids[0]
            bit = 1 << (eos % 32)
            bitmask[row, eos // 32] |= bit - (1 << 32) if bit >= 1 << 31 else bit  # int32: bit 31 is the sign

    def accept(self, token_id: int) -> bool:
        """Advance by one token; False (state unchanged) when the grammar does not allow it here."""
        if self._matcher.is_terminated():
            return False
        return bool(self._matcher.accept_token(int(token_id)))

    def rollback(self, num_tokens: int) -> None:
        self._matcher.rollback(num_tokens)

    @property
    def terminated(self) -> bool:
        """The output is complete and its end-of-sequence accepted: nothing more may follow."""
        return self._matcher.is_terminated()


def mask_logits(logits: torch.Tensor, matchers: list[Matcher | None]) -> torch.Tensor:
    """`logits` (rows x vocab, float32) with each constrained row's disallowed tokens at -inf (in place)."""
    rows = [i for i, m in enumerate(matchers) if m is not None]
    if not rows:
        return logits
    xgr = matchers[rows[0]]._xgr
    bitmask = xgr.allocate_token_bitmask(len(matchers), logits.shape[-1])
    for i in rows:
        matchers[i].fill(bitmask, i)
    xgr.apply_token_bitmask_inplace(logits, bitmask, vocab_size=logits.shape[-1], indices=rows)
    return logits
