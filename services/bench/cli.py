"""The flags of `kvmesh bench serve` and `kvmesh bench trace-gen` (names from `vllm bench serve` where it has
them); the implementations are imported only when a sub-command runs."""

from __future__ import annotations

import argparse

from kvmesh.services.bench.client import APIS
from kvmesh.services.bench.lengths import SHAREGPT_INPUT, SHAREGPT_OUTPUT


def _rate(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"a rate must be > 0 (inf sends all at once), got {text}")
    return value


def _token_ids(text: str) -> tuple[int, int]:
    lo, _, hi = text.partition(":")
    try:
        return int(lo), int(hi)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--token-ids takes LO:HI, got {text!r}") from None


def _add_dataset(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("dataset")
    g.add_argument("--dataset-name", default="random", choices=["random", "multiturn", "mooncake"])
    g.add_argument("--dataset-path", help="the Mooncake-format JSONL trace (--dataset-name mooncake)")
    g.add_argument("--num-prompts", type=int, default=None,
                   help="requests to send (default 1000; a trace: all of its records)")
    g.add_argument("--input-len", "--random-input-len", dest="input_len", default=SHAREGPT_INPUT,
                   help="prompt length: N, fixed:N, uniform:LO:HI or lognormal:MEDIAN:SIGMA (a multi-turn "
                        "dataset: each new user message)")
    g.add_argument("--output-len", "--random-output-len", dest="output_len", default=SHAREGPT_OUTPUT,
                   help="output tokens asked for (ignore_eos holds them), same forms as --input-len")
    g.add_argument("--random-prefix-len", type=int, default=0, help="a common prefix before every random prompt")
    g.add_argument("--multiturn-turns", type=int, default=3, help="turns per conversation")
    g.add_argument("--num-system-prompts", type=int, default=1, help="distinct shared system prompts")
    g.add_argument("--system-prompt-len", type=int, default=128, help="tokens of each system prompt")
    g.add_argument("--trace-block-size", type=int, default=512, help="tokens per trace hash id (Mooncake: 512)")
    g.add_argument("--token-ids", type=_token_ids, default=(100, 1000),
                   help="prompt token ids are drawn from [LO, HI): inside the served model's vocabulary")


def _add_load(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("load")
    g.add_argument("--request-rate", type=_rate, default=None,
                   help="requests (conversations) per second; inf sends all at once (the default, except a "
                        "trace, which is replayed at its recorded timestamps)")
    g.add_argument("--burstiness", type=float, default=1.0,
                   help="gamma shape of the gaps: 1.0 is Poisson, < 1 burstier, > 1 steadier")
    g.add_argument("--constant-rate", action="store_true", help="evenly spaced arrivals instead of gamma")
    g.add_argument("--max-concurrency", type=int, default=None, help="most requests in flight at once")
    g.add_argument("--time-scale", type=float, default=1.0, help="stretch a trace's timestamps (0.5: twice as fast)")
    g.add_argument("--sweep", default=None,
                   help="comma-separated rates: one run each, then goodput vs rate and the max rate at 90%% SLO")
    g.add_argument("--seed", type=int, default=0)


def add_serve_arguments(p: argparse.ArgumentParser) -> None:
    """Flags of `kvmesh bench serve`."""
    p.add_argument("--base-url", default=None,
                   help="the gateway: http://127.0.0.1:8000 (--api http) or 127.0.0.1:50051 (--api grpc)")
    p.add_argument("--api", default="http", choices=APIS,
                   help="OpenAI /v1/completions with SSE, or the gateway's gRPC Generate stream")
    p.add_argument("--http-client", default="native", choices=["native", "httpx"],
                   help="native: asyncio HTTP/1.1 (fast, thousands of streams); httpx: the reference client")
    p.add_argument("--model", default=None, help="the model name to send (default: the server's only model)")
    p.add_argument("--request-timeout-s", type=float, default=600.0)
    _add_dataset(p)
    _add_load(p)
    g = p.add_argument_group("results")
    g.add_argument("--slo-ttft-ms", type=float, default=None, help="TTFT target for goodput")
    g.add_argument("--slo-tpot-ms", type=float, default=None, help="TPOT target for goodput")
    g.add_argument("--out", default=None, help="write the summary and every request's timings as JSON")
    g.add_argument("--plot", default=None, help="write PNG plots (needs matplotlib)")
    g.add_argument("--progress-interval-s", type=float, default=5.0)
    g.add_argument("--no-progress", action="store_true")


def add_trace_gen_arguments(p: argparse.ArgumentParser) -> None:
    """Flags of `kvmesh bench trace-gen`."""
    p.add_argument("--out", required=True, help="the JSONL file to write")
    p.add_argument("--num-requests", type=int, default=1000)
    p.add_argument("--rate", type=_rate, default=1.0, help="requests per second over all turns (Poisson)")
    p.add_argument("--input-len", default=SHAREGPT_INPUT, help="first prompt / each new user message length")
    p.add_argument("--output-len", default=SHAREGPT_OUTPUT)
    p.add_argument("--prefix-reuse", type=float, default=0.5,
                   help="share of a conversation's first prompt that is a shared system-prompt prefix")
    p.add_argument("--num-system-prompts", type=int, default=4)
    p.add_argument("--turns", type=int, default=1, help="multi-turn depth (each turn resends the history)")
    p.add_argument("--turn-interval-s", type=float, default=2.0)
    p.add_argument("--block-size", type=int, default=512, help="tokens per hash id")
    p.add_argument("--seed", type=int, default=0)


def _serve(args: argparse.Namespace) -> int:
    from kvmesh.services.bench.serve_main import run_serve

    return run_serve(args)


def _trace_gen(args: argparse.Namespace) -> int:
    from kvmesh.services.bench.lengths import parse_length
    from kvmesh.services.bench.trace_gen import TraceSpec, generate, reuse_ratio, write_trace

    try:
        spec = TraceSpec(args.num_requests, args.rate, parse_length(args.input_len), parse_length(args.output_len),
                         args.prefix_reuse, args.num_system_prompts, args.turns, args.turn_interval_s,
                         args.block_size, args.seed)
        records = generate(spec)
    except ValueError as exc:
        print(f"kvmesh bench trace-gen: {exc}")
        return 2
    write_trace(records, args.out)
    span_s = (records[-1]["timestamp"] - records[0]["timestamp"]) / 1000
    print(f"wrote {len(records)} requests over {span_s:.1f} s to {args.out}; "
          f"block reuse {reuse_ratio(records):.1%}")
    return 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """`kvmesh bench serve` and `kvmesh bench trace-gen` under `parser`."""
    sub = parser.add_subparsers(dest="bench_command", required=True)
    serve = sub.add_parser("serve", help="put a load on a running mesh (or any OpenAI server) and measure it")
    add_serve_arguments(serve)
    serve.set_defaults(func=_serve)
    trace = sub.add_parser("trace-gen", help="write a Mooncake-format trace with prefix reuse and multi-turn")
    add_trace_gen_arguments(trace)
    trace.set_defaults(func=_trace_gen)
