"""Compile protos/kvmesh/v1/*.proto into the importable package kvmesh.v1 (run after editing a .proto).

    python protos/generate.py          # regenerate in place
    python protos/generate.py --check  # exit 1 if the committed stubs are stale (used by the tests)
"""

from __future__ import annotations

import argparse
import re
import shutil
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
PACKAGE = HERE / "kvmesh" / "v1"


def compile_into(out: Path) -> None:
    """Run protoc (from grpcio-tools) on every .proto, writing *_pb2.py, *_pb2.pyi and *_pb2_grpc.py under out."""
    from grpc_tools import protoc
    import grpc_tools

    include = Path(grpc_tools.__file__).parent / "_proto"
    protos = sorted(str(p.relative_to(HERE)) for p in PACKAGE.glob("*.proto"))
    args = ["protoc", f"-I{HERE}", f"-I{include}", f"--python_out={out}", f"--pyi_out={out}",
            f"--grpc_python_out={out}", *protos]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")


def generated(folder: Path) -> list[Path]:
    return sorted(p for p in folder.glob("*_pb2*") if p.suffix in (".py", ".pyi"))


# The generator's own version, stamped into every stub: a patch release of grpcio-tools or protobuf changes these
# lines and nothing the stubs do, so --check does not call such stubs stale (the committed stamps are the minimum
# runtime versions, which pyproject's pins match).
_STAMPS = re.compile(r"^(# Protobuf Python Version: |GRPC_GENERATED_VERSION = )\S+$"
                     r"|^(_runtime_version\.ValidateProtobufRuntimeVersion\(\n\s+\S+,)\n\s+\d+,\n\s+\d+,\n\s+\d+,",
                     re.MULTILINE)


def _unstamped(path: Path) -> str:
    return _STAMPS.sub(lambda m: m.group(1) or m.group(2), path.read_text())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare instead of writing")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        compile_into(Path(tmp))
        fresh = generated(Path(tmp) / "kvmesh" / "v1")
        stale = [p for p in fresh if not (PACKAGE / p.name).exists()
                 or _unstamped(p) != _unstamped(PACKAGE / p.name)]
        extra = {p.name for p in generated(PACKAGE)} - {p.name for p in fresh}
        if not args.check:  # only stubs whose content changed: the others keep their (minimum-version) stamps
            for p in stale:
                shutil.copyfile(p, PACKAGE / p.name)
            return 0
    if stale or extra:
        print(f"stale generated stubs: {sorted(p.name for p in stale) + sorted(extra)}; "
              f"run python protos/generate.py")
        return 1
    return 0

if __name__ == "__main__":
    sys.exit(main())
