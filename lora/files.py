"""Reading and writing safetensors, and nothing else: pickles are refused, writes are atomic.

A pickle (`.bin`, `.pt`, `.ckpt`, ...) runs code when it is loaded, so an uploaded adapter in
that container is refused before anything reads it, with a reason that says how to convert it.
Every write is atomic (impasto.atomic_files): a reader never sees half a file, and a crash
leaves the old one intact.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from impasto.atomic_files import replacing_file

from .errors import AdapterFormatError

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
_ZIP_MAGIC = b"PK\x03\x04"  # torch.save's default container
_PICKLE_PROTOCOL_2PLUS = b"\x80"  # first byte of a pickle of protocol >= 2


def _refuse_pickle(path: Path) -> None:
    raise AdapterFormatError(
        f"{path}: pickle checkpoints are refused (loading one can run arbitrary code). "
        "Convert it to .safetensors in a trusted environment first, e.g. "
        "`safetensors.torch.save_file(torch.load(p, weights_only=True), 'out.safetensors')`."
    )


def read_safetensors(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of a safetensors file; anything else is refused with the reason."""
    path = Path(path)
    if not path.is_file():
        raise AdapterFormatError(f"{path}: no such file")
    if path.suffix.lower() in PICKLE_SUFFIXES:
        _refuse_pickle(path)
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types; say what the file is instead
        with open(path, "rb") as f:
            head = f.read(4)
        if head.startswith(_ZIP_MAGIC) or head.startswith(_PICKLE_PROTOCOL_2PLUS):
            _refuse_pickle(path)
        raise AdapterFormatError(f"{path}: not a readable safetensors file ({e})") from e
    metadata.pop("format", None)  # safetensors' own "pt"/"np" marker, not the adapter's
    return tensors, metadata


def write_safetensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> Path:
    """Write atomically. Tensors are made contiguous (safetensors requires it)."""
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    with replacing_file(path) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt", **(metadata or {})})
    return Path(path)


def write_json(path: str | os.PathLike, obj) -> Path:
    with replacing_file(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True), encoding="utf-8")
    return Path(path)
