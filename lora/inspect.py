"""`inspect`: what an adapter file is: format, components, ranks, targets, size, hashes."""

from __future__ import annotations

import os
from pathlib import Path

from .canonical import CanonicalAdapter
from .hashing import a1111_short_hash
from .load import load_adapter


def describe(adapter: CanonicalAdapter, path: str | os.PathLike | None = None) -> dict:
    """A JSON-able summary of an adapter."""
    info = {
        "format": adapter.source_format,
        "components": adapter.components,
        "num_targets": len(adapter.modules),
        "targets_per_component": {c: len(adapter.modules_of(c)) for c in adapter.components},
        "ranks": adapter.ranks,
        "alphas": sorted({m.alpha for m in adapter.modules.values()}),
        "conv_targets": sum(m.is_conv for m in adapter.modules.values()),
        "dtypes": sorted({str(m.down.dtype) for m in adapter.modules.values()}),
        "num_parameters": adapter.num_parameters,
        "tensor_bytes": adapter.nbytes,
        "embeddings": {t: {c: list(v.shape) for c, v in per.items()} for t, per in adapter.embeddings.items()},
        "content_hash": adapter.content_hash,
        "targets": sorted(adapter.modules),
        "warnings": list(adapter.warnings),
        "metadata": {k: v for k, v in adapter.metadata.items() if len(v) <= 200},
    }
    if adapter.file_sha256:
        info["a1111_hash"] = adapter.file_sha256
        info["a1111_short_hash"] = a1111_short_hash(adapter.file_sha256)
    if path is not None:
        p = Path(path)
        info["path"] = str(p)
        info["file_bytes"] = sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) if p.is_dir() else p.stat().st_size
    return info


def inspect_adapter(path: str | os.PathLike, **load_kwargs) -> dict:
    return describe(load_adapter(path, **load_kwargs), path)


def format_description(info: dict, show_targets: bool = False) -> str:
    """Human-readable lines for `impasto lora inspect`."""
    lines = [
        f"path:         {info.get('path', '-')}",
        f"format:       {info['format']}",
        f"components:   {', '.join(f'{c} ({n})' for c, n in info['targets_per_component'].items()) or '-'}",
        f"ranks:        {', '.join(f'{r} x{n}' for r, n in info['ranks'].items()) or '-'}",
        f"alphas:       {', '.join(f'{a:g}' for a in info['alphas']) or '-'}",
        f"conv targets: {info['conv_targets']}",
        f"dtypes:       {', '.join(info['dtypes']) or '-'}",
        f"parameters:   {info['num_parameters']:,} ({info['tensor_bytes'] / 2**20:.2f} MiB of tensors"
        + (f", {info['file_bytes'] / 2**20:.2f} MiB on disk)" if "file_bytes" in info else ")"),
        f"content hash: {info['content_hash']}",
    ]
    if "a1111_hash" in info:
        lines.append(f"A1111 hash:   {info['a1111_hash']} (Lora hashes: {info['a1111_short_hash']})")
    if info["embeddings"]:
        lines.append("embeddings:   " + ", ".join(f"{t} {per}" for t, per in info["embeddings"].items()))
    for w in info["warnings"]:
        lines.append(f"warning:      {w}")
    if show_targets:
        lines += ["targets:"] + [f"  {t}" for t in info["targets"]]
    return "\n".join(lines)
