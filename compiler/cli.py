"""`impasto compile MODEL --backend B [--precision P] [--profile WxH:min-max ...] --out ENGINES_DIR`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .build import BACKENDS, PRECISIONS, BuildRequest, compile_model
from .profiles import parse_profile


def add_compile_command(subparsers) -> argparse.ArgumentParser:
    """Add the `compile` subcommand to the `impasto` CLI's subparsers; it sets `func`."""
    precisions = sorted({p for values in PRECISIONS.values() for p in values})
    parser = subparsers.add_parser(
        "compile",
        help="build engines for a model folder (ONNX Runtime, OpenVINO, TensorRT)",
        description="Export a diffusers model folder and build an engine folder with a manifest and refit map.",
    )
    parser.add_argument("model", type=Path, help="diffusers-layout model folder (safetensors)")
    parser.add_argument("--backend", required=True, choices=BACKENDS)
    parser.add_argument("--precision", default="fp32", choices=precisions,
                        help="fp32 everywhere; bf16/int8 (OpenVINO CPU), fp16 (GPUs)")
    parser.add_argument("--profile", action="append", default=[], type=parse_profile, metavar="WxH:MIN-MAX",
                        help="image size in pixels and engine batch range; repeatable (default: native size, batch 1-2)")
    parser.add_argument("--out", required=True, type=Path, help="engines directory; the engine folder is created inside")
    parser.set_defaults(func=run_compile)
    return parser


def run_compile(args: argparse.Namespace) -> int:
    request = BuildRequest(model_dir=args.model, backend=args.backend, out_dir=args.out,
                           precision=args.precision, profiles=tuple(args.profile))
    result = compile_model(request, log=lambda message: print(message, file=sys.stderr))
    print(result.folder)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Standalone entry (`python -m impasto.compiler.cli compile ...`) until the impasto CLI wires it."""
    parser = argparse.ArgumentParser(prog="impasto")
    add_compile_command(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
