"""`kvmesh generate`: offline generation in one process (filled in with the engine)."""


def add_arguments(parser):
    parser.add_argument("--model", required=True)


def run(args):
    raise SystemExit("kvmesh generate: not built yet")
