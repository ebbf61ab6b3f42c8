"""Generate the Python protobuf and gRPC code from proto/ for the server and the client.

Both distributions get their own copy, so the client imports nothing from the server and the
server needs no client installed. protoc writes absolute imports (`from impasto.v1 import x_pb2`)
that would point both copies at one top-level `impasto.v1` package; we rewrite them to relative
imports so each copy is self-contained under its own package.

Usage: python scripts/gen_proto.py      (needs grpcio-tools)
"""

from __future__ import annotations

import re
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "proto"
TARGETS = [ROOT / "server" / "rpc" / "pb", ROOT / "clients" / "python" / "impasto_client" / "pb"]
ABSOLUTE_IMPORT = re.compile(r"^from impasto\.v1 import (\w+_pb2) as", re.MULTILINE)


def generate() -> None:
    from grpc_tools import protoc  # dev-time dependency only

    protos = sorted(str(p.relative_to(PROTO_ROOT)) for p in PROTO_ROOT.rglob("*.proto"))
    include = str(Path(protoc.__file__).parent / "_proto")
    with tempfile.TemporaryDirectory() as tmp:
        args = ["protoc", f"-I{PROTO_ROOT}", f"-I{include}", f"--python_out={tmp}", f"--pyi_out={tmp}", f"--grpc_python_out={tmp}", *protos]
        if protoc.main(args) != 0:
            sys.exit("protoc failed")
        generated = sorted((Path(tmp) / "impasto" / "v1").glob("*_pb2*.py*"))
        for target in TARGETS:
            target.mkdir(parents=True, exist_ok=True)
            init = target / "__init__.py"
            if not init.exists():
                init.write_text('"""Generated protobuf code (scripts/gen_proto.py); do not edit."""\n')
            for src in generated:
                text = ABSOLUTE_IMPORT.sub(r"from . import \1 as", src.read_text())
                tmp_out = target / (src.name + ".tmp")
                tmp_out.write_text(text)
                tmp_out.replace(target / src.name)
    print(f"generated {len(generated)} files into {len(TARGETS)} packages from {len(protos)} protos")


if __name__ == "__main__":
    generate()
