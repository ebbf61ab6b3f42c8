"""Merging several adapters into one (the toolbox's `merge`).

- `merge_cat`: concatenate ranks. For each target, down = [down₁; down₂; …] and
  up = [w₁s₁up₁, w₂s₂up₂, …], so up @ down = Σ wᵢsᵢ upᵢ@downᵢ exactly (peft's `cat`,
  cloneofsimo's `ljl`). The rank is the sum of the ranks.
- `merge_linear`: mix the A and B matrices separately (peft's `linear`, cloneofsimo's `lpl`):
  down = Σ sign(cᵢ)·√|cᵢ|·downᵢ, up = Σ √|cᵢ|·upᵢ with cᵢ = wᵢsᵢ, as peft 0.21.2
  `_generalized_task_arithmetic_weighted_adapter` does. Then
  up @ down = Σᵢ cᵢ upᵢ@downᵢ + Σᵢ≠ⱼ √|cᵢ|·sign(cⱼ)√|cⱼ| upᵢ@downⱼ: the second sum is the cross
  terms, so this is NOT the weighted sum of the deltas (it is only for a single adapter). It
  keeps the rank and needs every adapter at a target to have the same rank.
- `merge_svd`: sum the deltas exactly, then truncate by SVD to rank r: exact when r is at least
  the summed rank, the best rank-r approximation (Frobenius) otherwise.
All three return alpha = rank (scale 1): the weights and scales are folded into the matrices.
Embeddings are carried over; the same token in two adapters is an error.
"""

from __future__ import annotations

import math

import torch

from .canonical import CanonicalAdapter, LoraModule
from .compose import AdapterSet
from .errors import AdapterFormatError


def _merged_embeddings(items: AdapterSet) -> dict:
    out: dict = {}
    for adapter, _ in items:
        for token, per in adapter.embeddings.items():
            if token in out:
                raise AdapterFormatError(f"embedding token {token!r} is in more than one adapter; rename one before merging")
            out[token] = dict(per)
    return out


def _targets(items: AdapterSet) -> list[str]:
    seen: dict[str, None] = {}
    for adapter, _ in items:
        for t in adapter.modules:
            seen.setdefault(t, None)
    return list(seen)


def _check_shapes(items: AdapterSet, target: str) -> None:
    shapes = {a.modules[target].delta_shape for a, _ in items if target in a.modules}
    if len(shapes) > 1:
        raise AdapterFormatError(f"{target}: adapters disagree on the weight shape: {sorted(shapes)}")


def merge_cat(items: AdapterSet, dtype: torch.dtype | None = None) -> CanonicalAdapter:
    """Exact merge by rank concatenation. `dtype` defaults to the first adapter's dtype at each target."""
    modules = {}
    for target in _targets(items):
        _check_shapes(items, target)
        parts = [(a.modules[target], float(w)) for a, w in items if target in a.modules]
        out_dtype = dtype or parts[0][0].down.dtype
        down = torch.cat([m.down.float() for m, _ in parts], dim=0)
        up = torch.cat([m.up.float() * (w * m.scale) for m, w in parts], dim=1)
        modules[target] = LoraModule(down=down.to(out_dtype), up=up.to(out_dtype), alpha=float(down.shape[0]))
    return CanonicalAdapter(modules=modules, embeddings=_merged_embeddings(items), source_format="merge:cat")


def merge_linear(items: AdapterSet, dtype: torch.dtype | None = None) -> CanonicalAdapter:
    """peft's `linear` mix of A and B (see the module docstring for its cross terms)."""
    modules = {}
    for target in _targets(items):
        _check_shapes(items, target)
        parts = [(a.modules[target], float(w)) for a, w in items if target in a.modules]
        ranks = {m.rank for m, _ in parts}
        if len(ranks) > 1:
            raise AdapterFormatError(f"{target}: linear merge needs equal ranks, got {sorted(ranks)}; use cat or svd")
        out_dtype = dtype or parts[0][0].down.dtype
        down = torch.zeros_like(parts[0][0].down, dtype=torch.float32)
        up = torch.zeros_like(parts[0][0].up, dtype=torch.float32)
        for m, w in parts:
            c = w * m.scale
            root = math.sqrt(abs(c))
            down += math.copysign(root, c) * m.down.float()  # sign on one side only, as peft
            up += root * m.up.float()
        modules[target] = LoraModule(down=down.to(out_dtype), up=up.to(out_dtype), alpha=float(down.shape[0]))
    return CanonicalAdapter(modules=modules, embeddings=_merged_embeddings(items), source_format="merge:linear")


def low_rank(delta: torch.Tensor, rank: int, clamp_quantile: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(up, down) with up @ down ≈ delta at `rank`, by SVD in fp32; conv deltas are flattened to
    (out, in·k·k) and the factors reshaped back (down k×k, up 1×1).

    `clamp_quantile` (kohya's extract script, default there 0.99): hi = that quantile of the
    signed entries of both factors together, and both factors are clamped to [-hi, hi], which
    trims outliers at a small cost in accuracy. 1.0 or None: no clamp.
    """
    shape = delta.shape
    mat = delta.float().flatten(1)
    rank = max(1, min(rank, *mat.shape))
    u, s, vh = torch.linalg.svd(mat, full_matrices=False)
    up = u[:, :rank] * s[:rank]
    down = vh[:rank].clone()
    if clamp_quantile is not None and clamp_quantile < 1.0:
        hi = _quantile(torch.cat([up.flatten(), down.flatten()]), clamp_quantile)
        up = up.clamp(-hi, hi)
        down = down.clamp(-hi, hi)
    if len(shape) == 4:
        up = up.reshape(shape[0], rank, 1, 1)
        down = down.reshape(rank, shape[1], shape[2], shape[3])
    return up, down


def _quantile(x: torch.Tensor, q: float) -> torch.Tensor:
    """torch.quantile's default (linear) rule by sorting: torch.quantile refuses > 2**24 elements."""
    v = torch.sort(x.flatten()).values
    pos = q * (v.numel() - 1)
    lo = int(pos)
    hi = min(lo + 1, v.numel() - 1)
    return v[lo] + (pos - lo) * (v[hi] - v[lo])


def merge_svd(items: AdapterSet, rank: int, dtype: torch.dtype | None = None, clamp_quantile: float | None = None) -> CanonicalAdapter:
    """Sum the weighted deltas exactly, then keep the best rank-`rank` approximation of each."""
    modules = {}
    for target in _targets(items):
        _check_shapes(items, target)
        parts = [(a.modules[target], float(w)) for a, w in items if target in a.modules]
        out_dtype = dtype or parts[0][0].down.dtype
        total = sum(w * m.delta(torch.float32) for m, w in parts)
        up, down = low_rank(total, rank, clamp_quantile)
        modules[target] = LoraModule(down=down.to(out_dtype), up=up.to(out_dtype), alpha=float(down.shape[0]))
    return CanonicalAdapter(modules=modules, embeddings=_merged_embeddings(items), source_format="merge:svd")
