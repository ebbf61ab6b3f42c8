"""File hashes as AUTOMATIC1111 writes them in infotext (`Lora hashes: name: 0123456789ab`).

Checked against AUTOMATIC1111/stable-diffusion-webui:
- `modules/hashes.py::addnet_hash_safetensors` (taken from kohya-ss `library/train_util.py`):
  sha256 over the bytes after the safetensors header, i.e. skip the 8-byte little-endian header
  length and the JSON header, hash the tensor data to the end of the file. Metadata edits
  therefore do not change it.
- `extensions-builtin/Lora/network.py`: `NetworkOnDisk.read_hash` uses that hash for
  `.safetensors` files (`use_addnet_hash=self.is_safetensors`), and `set_hash` keeps
  `shorthash = hash[0:12]`.
- `extensions-builtin/Lora/extra_networks_lora.py` writes `Lora hashes` as
  `"alias: shorthash"` joined by ", " (alias with ':' and ',' removed).
kohya's trainer stores the same hash precomputed as `sshs_model_hash` metadata; older A1111
versions preferred that value, the current one recomputes it from the file. We always compute
it from the file, which is what the current version shows.

Embeddings are hashed differently: `modules/textual_inversion/textual_inversion.py` sets an
embedding's hash to `hashes.sha256(path, ...)` without `use_addnet_hash`, the sha256 of the whole
file, and `modules/sd_hijack_clip.py` writes `TI hashes` with the same `"name: shorthash"` layout
(12 characters, ':' and ',' removed from the name), so `lora_hashes_infotext` writes both.
"""

from __future__ import annotations

import hashlib
import os

_BLOCK = 1 << 20


def addnet_hash(path: str | os.PathLike) -> str:
    """sha256 (hex) of a safetensors file's tensor-data section, as A1111 and kohya compute it."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        f.seek(8 + n)
        for chunk in iter(lambda: f.read(_BLOCK), b""):
            h.update(chunk)
    return h.hexdigest()


def whole_file_sha256(path: str | os.PathLike) -> str:
    """sha256 (hex) of every byte of a file: A1111's hash of an embedding (`TI hashes`)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_BLOCK), b""):
            h.update(chunk)
    return h.hexdigest()


def a1111_short_hash(full_hash: str) -> str:
    """The 12 hex characters A1111 shows in `Lora hashes` and `TI hashes`."""
    return full_hash[:12]


def lora_hashes_infotext(entries: list[tuple[str, str]]) -> str:
    """The value A1111 writes after `Lora hashes: ` (or `TI hashes: `, the same layout) for
    (alias, full hash) pairs, in prompt order.

    A1111's infotext writer then double-quotes the value (it contains ':' and ','):
    `Lora hashes: "name: 0123456789ab, other: ba9876543210"`; that quoting is the infotext
    writer's job, not this function's.
    """
    parts = []
    for alias, full_hash in entries:
        alias = alias.replace(":", "").replace(",", "")
        if alias and full_hash:
            parts.append(f"{alias}: {a1111_short_hash(full_hash)}")
    return ", ".join(parts)
