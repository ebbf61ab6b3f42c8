"""Reading and writing safetensors, and nothing else: pickles are refused, writes are atomic.

A pickle (`.bin`, `.pt`, `.ckpt`, ...) runs code when it is loaded, so an uploaded adapter in
that container is refused before anything reads it, with a reason that says how to convert it.
Every write goes to a temporary name in the destination's folder and is moved into place with
`os.replace` (files) or `os.rename` (folders), so a reader never sees half a file and a crash
leaves the old one intact.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from impasto.file_modes import usual_mode

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
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    meta = {"format": "pt", **(metadata or {})}
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=meta)
        os.replace(usual_mode(tmp), path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return path


def write_json(path: str | os.PathLike, obj) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=2, sort_keys=True)
        os.replace(usual_mode(tmp), path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return path


@contextlib.contextmanager
def atomic_directory(final: str | os.PathLike, overwrite: bool = False):
    """Yield a temporary folder beside `final`; on success it becomes `final` in one rename.

    `final` existing is an error unless `overwrite`; then the old folder is moved aside, the new
    one renamed in, and the old one deleted (a directory cannot be replaced by one rename).
    """
    final = Path(final)
    if final.exists() and not overwrite:
        raise FileExistsError(f"{final} exists; pass overwrite to replace it")
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
    try:
        yield tmp
        usual_mode(tmp)
        if final.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".old", dir=final.parent))
            os.rmdir(old)
            os.rename(final, old)
            os.rename(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
