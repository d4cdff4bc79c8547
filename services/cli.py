"""The `kvmesh` command: one sub-command per service plus the tools around them.

Each sub-command registers its flags here and imports its implementation lazily, so `kvmesh --help` stays
fast and a service pulls in only what it needs.
"""

from __future__ import annotations

import argparse
import sys

from kvmesh.services.common.config import ConfigError


def _model_init(args: argparse.Namespace) -> int:
    from kvmesh.services.engine.model_init import init_model

    path = init_model(args.path, preset=args.preset, family=args.family, seed=args.seed, dtype=args.dtype)
    print(f"model written to {path}")
    return 0


def _model_import(args: argparse.Namespace) -> int:
    from kvmesh.services.engine.gguf_import import import_gguf

    path = import_gguf(args.gguf_file, args.out)
    print(f"model written to {path}")
    return 0


def _add_model(sub: argparse._SubParsersAction) -> None:
    from kvmesh.services.engine.model_init import FAMILIES  # no torch or transformers at import

    model = sub.add_parser("model", help="make or import model checkpoints")
    msub = model.add_subparsers(dest="model_command", required=True)
    init = msub.add_parser("init", help="make a random-weight model of a family with a real tokenizer")
    init.add_argument("path")
    init.add_argument("--preset", default="tiny", choices=["tiny", "tiny-kv3", "small"])
    init.add_argument("--family", default="llama", choices=list(FAMILIES))
    init.add_argument("--seed", type=int, default=0)
    init.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    init.set_defaults(func=_model_init)
    imp = msub.add_parser("import", help="convert a GGUF checkpoint into an HF folder the engine loads")
    imp.add_argument("gguf_file")
    imp.add_argument("out")
    imp.set_defaults(func=_model_import)


def _certs_init(args: argparse.Namespace) -> int:
    from kvmesh.services.common.certs import ROLES, init_dir

    try:
        folder = init_dir(args.dir, args.host or (), days=args.days, force=args.force)
    except FileExistsError as exc:
        print(f"kvmesh certs init: {exc}", file=sys.stderr)
        return 2
    print(f"CA and certificates for {', '.join(ROLES)} written to {folder} (keep ca.key offline; mount each "
          f"service's <role>.pem, <role>.key and ca.pem, and pass --tls-dir)")
    return 0


def _certs_renew(args: argparse.Namespace) -> int:
    from kvmesh.services.common.certs import renew_dir

    try:
        roles = renew_dir(args.dir, args.host or (), args.role or (), days=args.days)
    except (FileNotFoundError, ValueError) as exc:
        print(f"kvmesh certs renew: {exc}", file=sys.stderr)
        return 2
    print(f"new keys and certificates for {', '.join(roles)} in {args.dir}, from its CA; running services "
          "present them within their --tls-reload-s (5 s by default)")
    return 0


def _add_certs(sub: argparse._SubParsersAction) -> None:
    certs = sub.add_parser("certs", help="make the CA and per-role certificates for mTLS between services")
    csub = certs.add_subparsers(dest="certs_command", required=True)
    init = csub.add_parser("init", help="a new CA and one certificate + key per role (gateway, scheduler, "
                                        "prefill, decode, worker, cache, admin) in DIR")
    init.add_argument("dir")
    init.add_argument("--host", action="append", metavar="NAME", help="a host name or IP the services are "
                      "dialled at, added to every certificate beside localhost and 127.0.0.1 (repeatable)")
    init.add_argument("--days", type=int, default=365, help="validity of the certificates")
    init.add_argument("--force", action="store_true", help="replace the certificates already in DIR")
    init.set_defaults(func=_certs_init)
    renew = csub.add_parser("renew", help="new keys and certificates from DIR's CA (ca.key needed), picked up by "
                                          "running services without a restart")
    renew.add_argument("dir")
    renew.add_argument("--role", action="append", help="renew only this role (repeatable; default: every role "
                       "with a certificate in DIR)")
    renew.add_argument("--host", action="append", metavar="NAME", help="serve these hosts instead of the old "
                       "certificate's (repeatable)")
    renew.add_argument("--days", type=int, default=365, help="validity of the new certificates")
    renew.set_defaults(func=_certs_renew)


def _add_generate(sub: argparse._SubParsersAction) -> None:
    from kvmesh.services import generate

    gen = sub.add_parser("generate", help="offline generation in one process, the prompts as one batch")
    generate.add_arguments(gen)
    gen.set_defaults(func=generate.run)


def _add_services(sub: argparse._SubParsersAction) -> None:
    """One sub-command per gRPC service; each module offers add_arguments(parser) and run(args) -> int."""
    from importlib import import_module

    services = {
        "scheduler": ("kvmesh.services.scheduler.main", "the worker registry and router"),
        "cache": ("kvmesh.services.cache.main", "the KV block cache service"),
        "prefill": ("kvmesh.services.prefill.main", "a prefill worker: computes prompts' KV for decode workers"),
        "decode": ("kvmesh.services.decode.main", "a decode worker: owns requests, decodes with continuous batching"),
        "gateway": ("kvmesh.services.gateway.main", "the client-facing gRPC and OpenAI-compatible HTTP API"),
        "worker": ("kvmesh.services.flexible.main", "a flexible worker (--role auto): prefill or decode, flipping "
                                                    "when the scheduler asks"),
    }
    for name, (module_name, help_text) in services.items():
        module = import_module(module_name)
        parser = sub.add_parser(name, help=help_text)
        module.add_arguments(parser)
        parser.set_defaults(func=module.run)


def _add_up(sub: argparse._SubParsersAction) -> None:
    from kvmesh.services import launcher

    up = sub.add_parser("up", help="start the whole mesh on this machine (scheduler, cache, workers, gateway)")
    launcher.add_arguments(up)
    up.set_defaults(func=launcher.run)


def _add_role(sub: argparse._SubParsersAction) -> None:
    from kvmesh.services.flexible import role_cli

    role = sub.add_parser("role", help="ask the scheduler to flip a flexible worker (--role auto) to a role")
    role_cli.add_arguments(role)
    role.set_defaults(func=role_cli.run)


def _add_trace(sub: argparse._SubParsersAction) -> None:
    from kvmesh.services.trace import cli as trace_cli

    trace = sub.add_parser("trace", help="draw requests' spans as waterfalls and split their TTFT into phases")
    trace_cli.add_arguments(trace)
    trace.set_defaults(func=trace_cli.run)


def _add_bench(sub: argparse._SubParsersAction) -> None:
    from kvmesh.services.bench import cli as bench_cli

    bench = sub.add_parser("bench", help="load-test a running mesh (serve) and write Mooncake traces (trace-gen)")
    bench_cli.add_arguments(bench)


def _add_plan(sub: argparse._SubParsersAction) -> None:
    from kvmesh.services.plan import cli as plan_cli

    plan = sub.add_parser("plan", help="profile this machine, simulate the mesh on a workload, and search the "
                                       "placements with the most goodput per core")
    plan_cli.add_arguments(plan)


def build_parser() -> argparse.ArgumentParser:
    """The whole command tree."""
    parser = argparse.ArgumentParser(prog="kvmesh", description="Disaggregated LLM serving.")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_model(sub)
    _add_certs(sub)
    _add_generate(sub)
    _add_services(sub)
    _add_up(sub)
    _add_role(sub)
    _add_trace(sub)
    _add_bench(sub)
    _add_plan(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `kvmesh` console script."""
    args = build_parser().parse_args(argv)
    try:
        return args.func(args) or 0
    except KeyboardInterrupt:
        return 130
    except ConfigError as exc:
        print(f"kvmesh {args.command}: bad configuration: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
