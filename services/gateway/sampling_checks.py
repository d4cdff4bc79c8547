"""Range checks of the sampling fields beyond the basics in `core.validate`: penalties, logit_bias and seed, so a
gRPC client hears INVALID_ARGUMENT from the gateway, before a route is made (the engine checks them again)."""

from __future__ import annotations

import math

from kvmesh.services.common.errors import InvalidArgumentError
from kvmesh.v1 import common_pb2

MAX_BIASED_TOKENS = 1024
#: Priorities lie in [-MAX_PRIORITY, MAX_PRIORITY] (lower is more urgent, as vLLM's; 0 the default).
MAX_PRIORITY = 1_000_000


def check_sampling_extras(s: common_pb2.SamplingParams, vocab_size: int) -> None:
    """Raise InvalidArgumentError naming the first penalty, bias, seed or priority out of range."""
    if not -MAX_PRIORITY <= s.priority <= MAX_PRIORITY:
        raise InvalidArgumentError(f"priority must be an integer in [-{MAX_PRIORITY}, {MAX_PRIORITY}] (lower is more "
                                   f"urgent; default 0), got {s.priority}")
    for name in ("presence_penalty", "frequency_penalty"):
        value = getattr(s, name)
        if not -2.0 <= value <= 2.0:
            raise InvalidArgumentError(f"{name} must be in [-2, 2], got {value}")
    if s.HasField("repetition_penalty") and not (0 < s.repetition_penalty <= 100
                                                 and math.isfinite(s.repetition_penalty)):
        raise InvalidArgumentError(f"repetition_penalty must be in (0, 100] (1 = off), got {s.repetition_penalty}")
    if len(s.logit_bias) > MAX_BIASED_TOKENS:
        raise InvalidArgumentError(f"logit_bias names {len(s.logit_bias)} tokens; at most {MAX_BIASED_TOKENS}")
    for token_id, bias in s.logit_bias.items():
        if not 0 <= token_id < vocab_size:
            raise InvalidArgumentError(f"logit_bias token {token_id} is outside the vocabulary [0, {vocab_size})")
        if not -100.0 <= bias <= 100.0:
            raise InvalidArgumentError(f"logit_bias for token {token_id} must be in [-100, 100], got {bias}")
    if s.HasField("seed") and s.seed < 0:
        raise InvalidArgumentError(f"seed must be >= 0, got {s.seed}")
    bad = [t for t in s.stop_token_ids if not 0 <= t < vocab_size]
    if bad:
        raise InvalidArgumentError(f"stop_token_ids {bad[:5]} are outside the vocabulary [0, {vocab_size})")
    if s.HasField("temperature") and not math.isfinite(s.temperature):
        raise InvalidArgumentError(f"temperature must be a finite number, got {s.temperature}")
