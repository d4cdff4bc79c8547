"""`kvmesh bench serve`: from flags to a dataset, one run or a sweep of runs, and their reports."""

from __future__ import annotations

import argparse
import math

from kvmesh.services.bench import datasets, report
from kvmesh.services.bench.client import API_HTTP, make_client
from kvmesh.services.bench.lengths import parse_length
from kvmesh.services.bench.metrics import Slo
from kvmesh.services.bench.progress import Progress
from kvmesh.services.bench.serve import LoadShape, RunOutcome, event_loop_runner, note, run_load

DEFAULT_NUM_PROMPTS = 1000
DEFAULT_BASE_URL = {API_HTTP: "http://127.0.0.1:8000"}
DEFAULT_GRPC_TARGET = "127.0.0.1:50051"


def build_sessions(args: argparse.Namespace) -> list[datasets.Session]:
    """The dataset the flags ask for."""
    tokens = datasets.BlockTokens(args.trace_block_size, args.seed, tuple(args.token_ids))
    if args.dataset_name == "mooncake":
        if not args.dataset_path:
            raise ValueError("--dataset-name mooncake needs --dataset-path TRACE.jsonl")
        return datasets.mooncake_sessions(datasets.read_mooncake(args.dataset_path), tokens, args.seed,
                                          args.num_prompts)
    num = args.num_prompts if args.num_prompts is not None else DEFAULT_NUM_PROMPTS
    input_len, output_len = parse_length(args.input_len), parse_length(args.output_len)
    if args.dataset_name == "multiturn":
        return datasets.multiturn_sessions(num, args.multiturn_turns, input_len, output_len, tokens, args.seed,
                                           args.num_system_prompts, args.system_prompt_len)
    return datasets.random_sessions(num, input_len, output_len, tokens, args.seed, args.random_prefix_len)


def _shape(args: argparse.Namespace, rate: float | None) -> LoadShape:
    return LoadShape(rate, args.burstiness, args.constant_rate, args.time_scale, args.max_concurrency, args.seed)


def _config(args: argparse.Namespace) -> dict:
    """The run's settings for the JSON file (inf written as a string: JSON has no infinity)."""
    out = {k: v for k, v in vars(args).items() if k != "func"}
    return {k: ("inf" if isinstance(v, float) and math.isinf(v) else v) for k, v in out.items()}


async def _run_all(args: argparse.Namespace, sessions, rates: list[float | None]) -> list[RunOutcome]:
    base_url = args.base_url or DEFAULT_BASE_URL.get(args.api, DEFAULT_GRPC_TARGET)
    total = sum(len(s.turns) for s in sessions)
    connections = min(args.max_concurrency or max(total, 1), _open_files_allowed() - 64)
    client = make_client(args.api, base_url, args.model, args.request_timeout_s, connections, args.http_client)
    slo = Slo(args.slo_ttft_ms, args.slo_tpot_ms)
    outcomes = []
    try:
        await _name_the_model(client)
        for rate in rates:
            label = f"rate {rate:g}: " if rate is not None else ""
            progress = Progress(total, args.progress_interval_s, label, enabled=not args.no_progress)
            outcomes.append(await run_load(sessions, client, _shape(args, rate), slo, progress))
    finally:
        await client.close()
    return outcomes


def _open_files_allowed() -> int:
    """Raise the soft limit on open files to the hard one (each HTTP/1.1 stream in flight holds a socket, and
    1,024 is a common default) and return it."""
    try:
        import resource
    except ImportError:  # pragma: no cover — not on Windows
        return 1 << 16
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 16)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
            soft = wanted
        except (ValueError, OSError):
            note(f"open files are limited to {soft}: at most {soft - 64} HTTP streams run at once")
    return soft if soft != resource.RLIM_INFINITY else 1 << 16


async def _name_the_model(client) -> None:
    """Without --model, send the server's first model id where it lists one (vLLM refuses a request without it;
    the kvmesh gateway takes its only model either way)."""
    if getattr(client, "model", "") or not hasattr(client, "model_ids"):
        return
    try:
        ids = await client.model_ids()
    except Exception as exc:  # noqa: BLE001 — a server without /v1/models still gets the load, with no model named
        note(f"could not list the server's models ({type(exc).__name__}: {exc}); sending no model name")
        return
    if ids:
        client.model = ids[0]
        note(f"model {ids[0]!r} (the server's first; --model to choose)")


def _plot(path: str, draw) -> None:
    from kvmesh.services.bench.plots import PlotUnavailable

    try:
        draw(path)
        note(f"plots written to {path}")
    except PlotUnavailable as exc:
        note(str(exc))


def run_serve(args: argparse.Namespace) -> int:
    """Run the benchmark the flags describe; 0 unless every request failed (or the flags were wrong)."""
    try:
        sessions = build_sessions(args)
        rates = [float(r) for r in args.sweep.split(",")] if args.sweep else [args.request_rate]
    except ValueError as exc:
        print(f"kvmesh bench serve: {exc}")
        return 2
    note(f"{sum(len(s.turns) for s in sessions)} requests in {len(sessions)} sessions, api {args.api}")
    outcomes = event_loop_runner()(_run_all(args, sessions, rates))
    config = _config(args)
    if args.sweep:
        points = [(rate, o.summary) for rate, o in zip(rates, outcomes)]
        for rate, outcome in zip(rates, outcomes):
            print(f"\nrate {rate:g} req/s\n" + report.summary_table(outcome.summary))
        print("\n" + report.sweep_table(points))
        payload = report.sweep_json(list(zip(rates, outcomes)), config)
        if args.plot:
            from kvmesh.services.bench.plots import plot_sweep
            _plot(args.plot, lambda path: plot_sweep(points, path))
    else:
        print(report.summary_table(outcomes[0].summary))
        payload = report.run_json(outcomes[0], config)
        if args.plot:
            from kvmesh.services.bench.plots import plot_run
            _plot(args.plot, lambda path: plot_run(outcomes[0].results, path))
    if args.out:
        report.write_json(args.out, payload)
        note(f"results written to {args.out}")
    return 0 if any(o.summary["completed"] for o in outcomes) else 1
