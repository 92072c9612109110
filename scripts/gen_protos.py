#!/usr/bin/env python3
"""Regenerate protos/stanchion/v1/*_pb2.py, *_pb2_grpc.py and *.pyi from the .proto sources.

protoc runs from the repository root with ``-I.``, so generated modules import each other as
``from protos.stanchion.v1 import types_pb2``. The pinned grpcio-tools (pyproject's dev extra) sets
the minimum grpcio/protobuf runtime of the generated code. ``--out DIR`` writes elsewhere (the drift
test uses it).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PROTO_DIR = Path("protos/stanchion/v1")


def generate(out_root: Path) -> list[Path]:
    from grpc_tools import protoc  # dev dependency, pinned in pyproject

    sources = sorted(str(p.relative_to(REPO)) for p in (REPO / PROTO_DIR).glob("*.proto"))
    include = str(Path(protoc.__file__).parent / "_proto")
    with tempfile.TemporaryDirectory() as tmp:
        args = [
            "protoc",
            "-I.",
            f"-I{include}",
            f"--python_out={tmp}",
            f"--pyi_out={tmp}",
            f"--grpc_python_out={tmp}",
            *sources,
        ]
        import os

        cwd = os.getcwd()
        os.chdir(REPO)
        try:
            rc = protoc.main(args)
        finally:
            os.chdir(cwd)
        if rc != 0:
            raise SystemExit(f"protoc failed with exit code {rc}")
        produced = sorted((Path(tmp) / PROTO_DIR).iterdir())
        dest = out_root / PROTO_DIR
        dest.mkdir(parents=True, exist_ok=True)
        written = []
        for f in produced:
            shutil.copyfile(f, dest / f.name)
            written.append(dest / f.name)
        return written


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=REPO, help="root to write protos/stanchion/v1/ under")
    args = parser.parse_args()
    for p in generate(args.out):
        print(p, file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
