"""Facts about a diffusers-layout model folder that both the server and the compiler need:
whether it can be loaded safely, and its hash.

The hash is AutoV2-style (A1111 shows the first 10 hex digits of a sha256). A1111 hashes one
checkpoint file; a diffusers model is a folder, so we hash a documented byte sequence
instead: for every `*.safetensors` file under the folder, in sorted order of its relative
POSIX path, the UTF-8 path, a NUL byte, then the file's bytes. Configs are left out so that
re-saving a JSON file with other whitespace does not change the model's identity.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth", ".pkl")
COMPONENTS = ("unet", "vae", "text_encoder")


class UnsafeModelError(ValueError):
    """The folder has weights only in a pickle format, which can run code when loaded."""


@dataclass(frozen=True)
class ModelHash:
    sha256: str

    @property
    def short(self) -> str:
        return self.sha256[:10]


def check_loadable(model_dir: Path) -> None:
    """Raise with a reason unless the folder is a diffusers model with safetensors weights."""
    if not (model_dir / "model_index.json").is_file():
        raise ValueError(f"{model_dir}: not a diffusers model folder (no model_index.json)")
    for component in COMPONENTS:
        folder = model_dir / component
        if not folder.is_dir():
            raise ValueError(f"{model_dir}: missing component folder '{component}'")
        if not any(folder.glob("*.safetensors")):
            pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
            if pickles:
                raise UnsafeModelError(
                    f"{folder}: weights are pickle files ({', '.join(pickles)}); pickles can run arbitrary "
                    "code when loaded, so only safetensors are served. Convert them with "
                    "diffusers' save_pretrained(safe_serialization=True)."
                )
            raise ValueError(f"{folder}: no .safetensors weights")


def hash_model_folder(model_dir: Path, chunk_bytes: int = 1 << 20) -> ModelHash:
    digest = hashlib.sha256()
    files = sorted(model_dir.rglob("*.safetensors"), key=lambda p: p.relative_to(model_dir).as_posix())
    for path in files:
        digest.update(path.relative_to(model_dir).as_posix().encode("utf-8") + b"\0")
        with open(path, "rb") as f:
            while chunk := f.read(chunk_bytes):
                digest.update(chunk)
    return ModelHash(digest.hexdigest())


_hash_cache: dict[tuple, ModelHash] = {}


def cached_model_hash(model_dir: Path) -> ModelHash:
    """hash_model_folder, memoised on the files' sizes and modification times."""
    files = sorted(model_dir.rglob("*.safetensors"))
    key = (str(model_dir.resolve()),) + tuple((str(p), (s := os.stat(p)).st_size, s.st_mtime_ns) for p in files)
    if key not in _hash_cache:
        _hash_cache[key] = hash_model_folder(model_dir)
    return _hash_cache[key]
