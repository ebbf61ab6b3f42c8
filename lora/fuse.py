"""Collapse adapters into a full diffusers model folder (the toolbox's `fuse`).

W' = W + Σ wᵢ·scaleᵢ·upᵢ@downᵢ for every target, added in fp32 and cast back to each file's own
dtype. The output is built in a temporary folder beside `out_folder` (a copy of the model folder
with the changed weight files rewritten, same file names, keys and metadata) and renamed into
place only when complete.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch
from safetensors import safe_open

from impasto.atomic_files import atomic_directory

from .compose import AdapterSet, compose
from .errors import AdapterFormatError
from .files import write_safetensors
from .model_folder import component_files, weight_shapes


def fuse_into_folder(
    model_folder: str | os.PathLike,
    items: AdapterSet,
    out_folder: str | os.PathLike,
    *,
    overwrite: bool = False,
    ignore_embeddings: bool = False,
) -> Path:
    """Write `model_folder` with `items` fused into its weights to `out_folder`; returns it.

    Every adapter is validated against the folder first (unmatched targets and shape mismatches
    raise before anything is written). Textual-inversion embeddings cannot be fused into weights
    (they need new tokenizer tokens), so an adapter with embeddings is refused unless
    `ignore_embeddings`.
    """
    model_folder, out_folder = Path(model_folder), Path(out_folder)
    if out_folder.resolve() == model_folder.resolve():
        raise ValueError("out_folder must differ from model_folder")
    with_embeddings = [a for a, _ in items if a.embeddings]
    if with_embeddings and not ignore_embeddings:
        tokens = sorted(t for a in with_embeddings for t in a.embeddings)
        raise AdapterFormatError(
            f"adapter has textual-inversion embeddings ({', '.join(tokens)}) which fusing cannot add to the "
            "tokenizer; export them separately or pass ignore_embeddings"
        )
    deltas = compose(items, named_weight_shapes=weight_shapes(model_folder), dtype=torch.float32)
    files = component_files(model_folder)

    # Which files hold a changed weight.
    by_file: dict[Path, dict[str, torch.Tensor]] = {}
    for component, paths in files.items():
        for path in paths:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                keys = set(f.keys())
            changed = {k: deltas[f"{component}.{k}"] for k in keys if f"{component}.{k}" in deltas}
            if changed:
                by_file[path] = changed
    rewritten = {p.resolve() for p in by_file}

    def skip(dirpath, names):
        return [n for n in names if (Path(dirpath) / n).resolve() in rewritten]

    with atomic_directory(out_folder, overwrite=overwrite) as tmp:
        os.rmdir(tmp)  # copytree wants to create it
        shutil.copytree(model_folder, tmp, ignore=skip)
        for path, changed in by_file.items():
            with safe_open(str(path), framework="pt", device="cpu") as f:
                metadata = dict(f.metadata() or {})
                tensors = {k: f.get_tensor(k) for k in f.keys()}
            for key, delta in changed.items():
                w = tensors[key]
                tensors[key] = (w.float() + delta.reshape(w.shape)).to(w.dtype)
            write_safetensors(tmp / path.relative_to(model_folder), tensors, metadata)
    return out_folder
