"""`impasto lora merge|extract|fuse|convert|inspect`: thin argparse layers over the library.

`add_lora_commands(subparsers)` registers them under the main CLI; each handler returns an exit
code, and errors from the library (AdapterFormatError / AdapterMismatchError) reach the user as
one line naming the file, key or module at fault. Commands that read adapter files take
`--model DIR` (fuse uses its model folder): cloneofsimo files cannot be placed without the
model's module list, which is built from that folder's configs, and kohya SDXL files' SGM block
numbers map by its UNet's layers_per_block.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .canonical import CanonicalAdapter
from .errors import AdapterFormatError, AdapterMismatchError
from .export import export_diffusers, export_kohya, export_peft_folder
from .extract import extract_lora_from_folders
from .formats.cloneofsimo import ModuleTreesNeeded
from .fuse import fuse_into_folder
from .inspect import describe, format_description
from .load import load_adapter
from .merge import merge_cat, merge_linear, merge_svd
from .model_folder import FolderModuleTrees, unet_config_of

OUTPUT_FORMATS = ("kohya", "diffusers", "peft")
MODEL_HELP = "diffusers model folder the adapters were trained on; cloneofsimo files need it to place their modules, kohya SDXL files to number their blocks"


def _adapter_arg(text: str) -> tuple[str, float]:
    """`path` or `path:weight` (the last `:` splits only if what follows is a number)."""
    path, sep, tail = text.rpartition(":")
    if sep:
        try:
            return path, float(tail)
        except ValueError:
            pass
    return text, 1.0


def _load(path, model_folder=None, **kw) -> CanonicalAdapter:
    """`load_adapter` with what `model_folder` (`--model`, or fuse's model) tells about the model:
    its module trees, which cloneofsimo files need (their modules are numbered in the model's
    order, not named), and its UNet config, by which kohya SDXL files' SGM block numbers map to
    diffusers' blocks (without it they are mapped for layers_per_block=2, with a warning)."""
    if model_folder:
        kw.setdefault("module_trees", FolderModuleTrees(model_folder))
        if (Path(model_folder) / "unet" / "config.json").is_file():
            kw.setdefault("unet_config", unet_config_of(model_folder))
    try:
        return load_adapter(path, **kw)
    except ModuleTreesNeeded as e:
        raise AdapterFormatError(
            f"{path}: a cloneofsimo file numbers its modules in the base model's order instead of naming "
            f"them; pass --model DIR, the diffusers model folder it was trained on"
        ) from e


def write_adapter(adapter: CanonicalAdapter, out: str | Path, fmt: str, *, overwrite: bool = False, drop_embeddings: bool = False) -> list[Path]:
    """Write in `fmt`; a PEFT export of several components makes `out/<component>/` folders."""
    out = Path(out)
    if fmt == "kohya":
        return [export_kohya(adapter, out)]
    if fmt == "diffusers":
        return [export_diffusers(adapter, out, drop_embeddings=drop_embeddings)]
    if fmt == "peft":
        components = [c for c in adapter.components if adapter.modules_of(c)]
        if len(components) == 1:
            return [export_peft_folder(adapter, out, component=components[0], overwrite=overwrite, drop_embeddings=drop_embeddings)]
        return [
            export_peft_folder(adapter, out / c, component=c, overwrite=overwrite, drop_embeddings=drop_embeddings)
            for c in components
        ]
    raise ValueError(f"unknown output format {fmt!r}")


def _cmd_inspect(args) -> int:
    for path in args.paths:
        info = describe(_load(path, args.model), path)
        print(json.dumps(info, indent=2) if args.json else format_description(info, show_targets=args.targets))
    return 0


def _cmd_convert(args) -> int:
    adapter = _load(args.input, args.model, component=args.component)
    for p in write_adapter(adapter, args.output, args.to, overwrite=args.overwrite, drop_embeddings=args.drop_embeddings):
        print(p)
    return 0


def _cmd_merge(args) -> int:
    items = [(_load(p, args.model), w) for p, w in map(_adapter_arg, args.adapter)]
    if args.mode == "cat":
        merged = merge_cat(items)
    elif args.mode == "linear":
        merged = merge_linear(items)
    else:
        if not args.rank:
            raise AdapterFormatError("--mode svd needs --rank")
        merged = merge_svd(items, args.rank, clamp_quantile=args.clamp_quantile)
    for p in write_adapter(merged, args.output, args.to, overwrite=args.overwrite):
        print(p)
    return 0


def _cmd_extract(args) -> int:
    adapter = extract_lora_from_folders(
        args.base, args.tuned, args.rank, conv_rank=args.conv_rank, clamp_quantile=args.clamp_quantile, min_diff=args.min_diff
    )
    if not adapter.modules:
        raise AdapterMismatchError(f"{args.tuned} does not differ from {args.base} by more than {args.min_diff}")
    for p in write_adapter(adapter, args.output, args.to, overwrite=args.overwrite):
        print(p)
    return 0


def _cmd_fuse(args) -> int:
    items = [(_load(p, args.model), w) for p, w in map(_adapter_arg, args.adapter)]
    print(fuse_into_folder(args.model, items, args.output, overwrite=args.overwrite, ignore_embeddings=args.ignore_embeddings))
    return 0


def _run(handler):
    def run(args) -> int:
        try:
            return handler(args)
        except (AdapterFormatError, AdapterMismatchError, FileExistsError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2

    return run


def add_lora_commands(subparsers) -> argparse.ArgumentParser:
    """Register `lora` and its subcommands; each sets `func(args) -> exit code`."""
    lora = subparsers.add_parser("lora", help="LoRA toolbox: merge, extract, fuse, convert, inspect")
    sub = lora.add_subparsers(dest="lora_command", required=True)

    p = sub.add_parser("inspect", help="format, ranks, targets, size and hashes of adapter files")
    p.add_argument("paths", nargs="+")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--targets", action="store_true", help="list every target module")
    p.add_argument("--model", metavar="DIR", help=MODEL_HELP)
    p.set_defaults(func=_run(_cmd_inspect))

    p = sub.add_parser("convert", help="rewrite an adapter in another format")
    p.add_argument("input")
    p.add_argument("output")
    p.add_argument("--to", choices=OUTPUT_FORMATS, required=True)
    p.add_argument("--component", help="for a PEFT folder input: unet, text_encoder or text_encoder_2")
    p.add_argument("--model", metavar="DIR", help=MODEL_HELP)
    p.add_argument("--drop-embeddings", action="store_true", help="allow losing embeddings (diffusers/PEFT have no place for them)")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=_run(_cmd_convert))

    p = sub.add_parser("merge", help="merge adapters: cat (exact), linear (A/B mixed), svd (rank r)")
    p.add_argument("output")
    p.add_argument("--adapter", action="append", required=True, metavar="PATH[:WEIGHT]")
    p.add_argument("--mode", choices=("cat", "linear", "svd"), default="cat")
    p.add_argument("--rank", type=int, help="rank for --mode svd")
    p.add_argument("--clamp-quantile", type=float, default=None)
    p.add_argument("--model", metavar="DIR", help=MODEL_HELP)
    p.add_argument("--to", choices=OUTPUT_FORMATS, default="kohya")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=_run(_cmd_merge))

    p = sub.add_parser("extract", help="LoRA of a fine-tuned model folder minus its base, by SVD")
    p.add_argument("base")
    p.add_argument("tuned")
    p.add_argument("output")
    p.add_argument("--rank", type=int, required=True)
    p.add_argument("--conv-rank", type=int, help="rank for k×k convs (default: --rank)")
    p.add_argument("--clamp-quantile", type=float, default=0.99)
    p.add_argument("--min-diff", type=float, default=0.0, help="skip weights whose largest change is at most this")
    p.add_argument("--to", choices=OUTPUT_FORMATS, default="kohya")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=_run(_cmd_extract))

    p = sub.add_parser("fuse", help="write a model folder with adapters fused into its weights")
    p.add_argument("model")
    p.add_argument("output")
    p.add_argument("--adapter", action="append", required=True, metavar="PATH[:WEIGHT]")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--ignore-embeddings", action="store_true")
    p.set_defaults(func=_run(_cmd_fuse))
    return lora


def main(argv=None) -> int:
    """Standalone entry for trying the toolbox before it is wired into `impasto`."""
    parser = argparse.ArgumentParser(prog="impasto")
    add_lora_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
