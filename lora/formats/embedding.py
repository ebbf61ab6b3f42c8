"""Standalone textual-inversion files: one token's vectors and no LoRA.

Layouts in the wild (safetensors only; `.pt` embeddings are pickles and refused before this):
- kohya-ss `train_textual_inversion.py` (and what A1111 loads from it): `{"emb_params": [n, dim]}`.
  The file does not hold its token: A1111 names an embedding after its file, so the caller
  passes the name (`token_name`; `load_adapter` uses the file stem, the server the upload's name).
  A flattened A1111 `.pt` (`string_to_param.*`) is read the same way.
- SDXL (kohya-ss, A1111): `{"clip_l": [n, 768], "clip_g": [n, 1280]}`, one set of rows per text
  encoder (`text_encoder`, `text_encoder_2`), named like the above.
- diffusers `learned_embeds.safetensors` (its textual-inversion example): `{"<token>": [dim] or
  [n, dim]}`; the key is the token, as `load_textual_inversion` reads it.

A1111 and diffusers both read exactly one embedding per file, so this parser does too. The format
is tried last (`formats.detect_format`): a single tensor is all it needs to be recognised, so any
LoRA layout must have had its chance first.
"""

from __future__ import annotations

import torch

from ..canonical import CanonicalAdapter
from ..errors import AdapterFormatError, list_keys

NAME = "embedding"
NAMED_KEYS = ("emb_params", "string_to_param.*")  # the token is the file's (or upload's) name
SDXL_KEYS = {"clip_l": "text_encoder", "clip_g": "text_encoder_2"}


def detect(state_dict, metadata) -> bool:
    keys = set(state_dict)
    if not keys:
        return False
    if keys <= set(SDXL_KEYS):
        return True
    return len(keys) == 1 and next(iter(state_dict.values())).ndim in (1, 2)


def _rows(value: torch.Tensor, key: str, where: str) -> torch.Tensor:
    if value.ndim not in (1, 2) or value.shape[-1] == 0 or value.numel() == 0:
        raise AdapterFormatError(f"{where}: '{key}' has shape {tuple(value.shape)}; an embedding is [dim] or [num_vectors, dim]")
    return value.reshape(-1, value.shape[-1])


def _named(token_name: str | None, where: str) -> str:
    if not token_name:
        raise AdapterFormatError(f"{where}: an A1111/kohya embedding file does not hold its token (A1111 uses the file's name); pass token_name")
    return token_name


def parse(state_dict, metadata, *, token_name: str | None = None, where: str = "embedding file", **_) -> CanonicalAdapter:
    keys = set(state_dict)
    if keys and keys <= set(SDXL_KEYS):
        if keys != set(SDXL_KEYS):
            raise AdapterFormatError(f"{where}: an SDXL embedding has both clip_l and clip_g; this file has only {list_keys(keys)}")
        per = {SDXL_KEYS[k]: _rows(state_dict[k], k, where) for k in sorted(keys)}
        counts = {c: int(v.shape[0]) for c, v in per.items()}
        if len(set(counts.values())) != 1:
            raise AdapterFormatError(f"{where}: clip_l and clip_g hold different numbers of vectors ({counts})")
        embeddings = {_named(token_name, where): per}
    elif len(keys) == 1:
        key = next(iter(keys))
        token = _named(token_name, where) if key in NAMED_KEYS else key
        embeddings = {token: {"text_encoder": _rows(state_dict[key], key, where)}}
    else:
        raise AdapterFormatError(f"{where}: an embedding file holds one token (as A1111 and diffusers read it); keys: {list_keys(keys)}")
    return CanonicalAdapter(modules={}, embeddings=embeddings, metadata=dict(metadata or {}), source_format=NAME)
