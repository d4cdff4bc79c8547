"""Protobuf ↔ engine conversions of the engine workers: sampling params and logprobs (the KV layout converts
itself: `kv_identity.KVLayout.to_proto`)."""

from __future__ import annotations

import asyncio

from kvmesh.v1 import common_pb2


def sampling_params(proto: common_pb2.SamplingParams):
    """Engine SamplingParams from the protobuf; unset fields take the documented defaults."""
    from kvmesh.services.engine.sampler import SamplingParams

    return SamplingParams(
        temperature=proto.temperature if proto.HasField("temperature") else 1.0,
        top_p=proto.top_p if proto.HasField("top_p") else 1.0,
        top_k=proto.top_k, min_p=proto.min_p,
        max_tokens=proto.max_tokens if proto.HasField("max_tokens") else 16,
        seed=proto.seed if proto.HasField("seed") else None,
        stop=tuple(proto.stop), stop_token_ids=tuple(proto.stop_token_ids), ignore_eos=proto.ignore_eos,
        logprobs=proto.logprobs if proto.HasField("logprobs") else None,
        presence_penalty=proto.presence_penalty, frequency_penalty=proto.frequency_penalty,
        repetition_penalty=proto.repetition_penalty if proto.HasField("repetition_penalty") else 1.0,
        logit_bias=tuple(sorted(proto.logit_bias.items())),
        structured=constraint(proto.structured_output) if proto.HasField("structured_output") else None,
        priority=proto.priority)


def constraint(proto: common_pb2.StructuredOutput):
    """The engine's Constraint of a StructuredOutput message."""
    from kvmesh.services.engine.structured import Constraint

    kind = proto.WhichOneof("kind") or ""
    value = proto.choice.choices if kind == "choice" else getattr(proto, kind) if kind else ""
    return Constraint.of(kind, value, proto.num_resumed_tokens)


async def compile_grammar(engine, params) -> None:
    """Compile a constrained request's grammar in a thread of its own (cached per process), before the engine
    thread sees the request: a slow compile delays that request only, never the batch or the event loop."""
    if params.structured is not None:
        await asyncio.to_thread(engine.grammars.compile, params.structured)


def logprob_protos(token_ids: list[int], entries) -> list[common_pb2.TokenLogprob]:
    """Engine logprob entries ({"logprob", "top": [(id, logprob), ...]}, or None) as TokenLogprob messages."""
    out = []
    for token_id, e in zip(token_ids, entries or ()):
        if e is None:
            continue
        top = e.get("top") or []
        out.append(common_pb2.TokenLogprob(token_id=token_id, logprob=e["logprob"],
                                           top_token_ids=[int(t) for t, _ in top],
                                           top_logprobs=[float(lp) for _, lp in top]))
    return out


def logprob_entry(proto: common_pb2.TokenLogprob) -> dict:
    """A TokenLogprob message as the engine's logprob entry (the inverse of `logprob_protos` for one token)."""
    return {"logprob": proto.logprob, "top": list(zip(proto.top_token_ids, proto.top_logprobs))}
