"""Extract a LoRA from a fine-tuned model: the SVD of (tuned − base) at rank r.

As kohya-ss `networks/extract_lora_from_models.py`: for every Linear and Conv weight, the
difference is factored by SVD (convs flattened to out × in·k·k), the top `rank` singular
vectors kept (up = U·S, down = Vh), both clamped at `clamp_quantile` (default 0.99, kohya's
CLAMP_QUANTILE), and alpha = rank. Differences whose largest entry is at most `min_diff` are
skipped (kohya uses this to tell that the text encoder was not trained).

Which weights count as Linear/Conv is read from the tensors: 2-D and 4-D `.weight`s, minus
embedding tables (2-D but not Linear: CLIP's token/position embeddings, a UNet's
class_embedding), whose module name ends in `embedding(s)`.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping

import torch

from .canonical import COMPONENTS, CanonicalAdapter, LoraModule, canonical_target
from .errors import AdapterMismatchError, list_keys
from .merge import low_rank
from .model_folder import read_weights


def is_lora_target_weight(name: str, tensor: torch.Tensor) -> bool:
    if not name.endswith(".weight") or tensor.ndim not in (2, 4):
        return False
    module = name[: -len(".weight")].rsplit(".", 1)[-1]
    return not module.endswith(("embedding", "embeddings"))


def extract_lora(
    base: Mapping[str, torch.Tensor],
    tuned: Mapping[str, torch.Tensor],
    rank: int,
    *,
    conv_rank: int | None = None,
    clamp_quantile: float | None = 0.99,
    min_diff: float = 0.0,
    include: str | None = None,
    dtype: torch.dtype = torch.float32,
) -> CanonicalAdapter:
    """LoRA of `tuned − base`. Both map `"<component>.<parameter name>"` to tensors.

    `conv_rank` is the rank for k×k convs (default `rank`); `include` a regex a weight name must
    match (`re.search`) to be extracted. Weights in one model and not the other, or of other
    shapes, are an error.
    """
    only_one = sorted(set(base) ^ set(tuned))
    if only_one:
        raise AdapterMismatchError(f"base and tuned models have different weights: {list_keys(only_one)}")
    pattern = re.compile(include) if include else None
    modules: dict[str, LoraModule] = {}
    for name in sorted(base):
        b, t = base[name], tuned[name]
        if not is_lora_target_weight(name, b):
            continue
        if pattern and not pattern.search(name):
            continue
        if b.shape != t.shape:
            raise AdapterMismatchError(f"{name}: base {tuple(b.shape)} vs tuned {tuple(t.shape)}")
        diff = t.float() - b.float()
        if diff.abs().max().item() <= min_diff:
            continue
        is_kxk = diff.ndim == 4 and tuple(diff.shape[2:]) != (1, 1)
        r = (conv_rank or rank) if is_kxk else rank
        up, down = low_rank(diff, r, clamp_quantile)
        component, _, param = name.partition(".")
        if component not in COMPONENTS:
            raise AdapterMismatchError(f"{name}: not under unet / text_encoder / text_encoder_2")
        target = canonical_target(component, param[: -len(".weight")])
        modules[target] = LoraModule(down=down.to(dtype).contiguous(), up=up.to(dtype).contiguous(), alpha=float(down.shape[0]))
    return CanonicalAdapter(modules=modules, source_format="extract")


def extract_lora_from_folders(base_folder: str | os.PathLike, tuned_folder: str | os.PathLike, rank: int, **kwargs) -> CanonicalAdapter:
    """`extract_lora` on two diffusers model folders (their safetensors weights)."""
    return extract_lora(read_weights(base_folder), read_weights(tuned_folder), rank, **kwargs)
