"""Regenerate the Python gRPC code in kata_vmcache/proto from protos/*.proto.

protoc writes `import cache_pb2`, a top-level import that only works with the
output directory on sys.path; we rewrite it to a package-relative import so the
generated modules live inside the package. tests/unit/test_proto_fresh.py runs
this into a temporary directory and fails when the committed files differ.

Usage: python scripts/gen_proto.py [OUTDIR]
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import grpc_tools
from grpc_tools import protoc  # type: ignore[import-untyped]

ROOT = Path(__file__).resolve().parent.parent
PROTOS = ROOT / "protos"
DEFAULT_OUT = ROOT / "kata_vmcache" / "proto"


def generate(out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    include = Path(grpc_tools.__file__).parent / "_proto"
    sources = sorted(PROTOS.glob("*.proto"))
    args = [
        "protoc",
        f"-I{PROTOS}",
        f"-I{include}",
        f"--python_out={out}",
        f"--pyi_out={out}",
        f"--grpc_python_out={out}",
        *(str(s) for s in sources),
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    written = []
    stems = [s.stem for s in sources]
    for path in sorted(out.glob("*_pb2*.py*")):
        text = path.read_text()
        for stem in stems:
            text = re.sub(
                rf"^import {stem}_pb2 as ",
                f"from . import {stem}_pb2 as ",
                text,
                flags=re.MULTILINE,
            )
        path.write_text(text)
        written.append(path)
    return written


if __name__ == "__main__":
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT_OUT
    for p in generate(target):
        print(p.relative_to(target))
