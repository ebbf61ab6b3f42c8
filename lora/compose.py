"""A set of (adapter, weight) -> one delta per target weight, and a byte-bounded cache of them.

delta[W] = Σᵢ wᵢ · scaleᵢ · upᵢ @ downᵢ, conv deltas reshaped to the kernel. Products and sums
are done in fp32 and cast to the requested dtype once at the end (summing fp16 deltas loses the
small ones). Adapters are summed in a fixed order (by content hash, then weight), not in request
order, so the same set gives bit-identical deltas however a request lists it; refitting A, then
B, then A again needs that.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from .canonical import CanonicalAdapter
from .match import match_targets

AdapterSet = Sequence[tuple[CanonicalAdapter, float]]


def _ordered(items: AdapterSet) -> list[tuple[CanonicalAdapter, float]]:
    return sorted(((a, float(w)) for a, w in items), key=lambda aw: (aw[0].content_hash, aw[1]))


def compose(
    items: AdapterSet,
    *,
    named_weight_shapes: Mapping[str, tuple[int, ...]] | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    allow_unmatched: bool = False,
) -> dict[str, torch.Tensor]:
    """{weight name: delta}.

    With `named_weight_shapes` (the base model's, see `match.py`), every adapter is validated
    first (unmatched targets and shape mismatches raise `AdapterMismatchError`), keys are the
    base weight names and deltas have the base weights' shapes. Without it, keys are
    `<target>.weight` and shapes the adapters' own. Adapters with weight 0 add nothing and are
    skipped (after validation).
    """
    ordered = _ordered(items)
    names: list[dict[str, str]] = []
    shapes: list[dict[str, tuple[int, ...]]] = []
    for adapter, _ in ordered:
        if named_weight_shapes is not None:
            report = match_targets(adapter, named_weight_shapes, allow_unmatched=allow_unmatched, raise_on_error=True)
            names.append(report.resolved)
            shapes.append(report.shapes)
        else:
            names.append({t: f"{t}.weight" for t in adapter.modules})
            shapes.append({t: m.delta_shape for t, m in adapter.modules.items()})

    acc: dict[str, torch.Tensor] = {}
    for (adapter, weight), name_of, shape_of in zip(ordered, names, shapes):
        if weight == 0.0:
            continue
        for target, name in name_of.items():
            d = adapter.modules[target].delta(torch.float32, device).reshape(shape_of[target])
            if name in acc:
                acc[name].add_(d, alpha=weight)
            else:
                acc[name] = d.mul_(weight)
    return {name: d.to(dtype) for name, d in acc.items()}


def deltas_nbytes(deltas: Mapping[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in deltas.values())


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    evictions: int = 0
    uncacheable: int = 0  # results larger than the whole budget, returned but not kept


class DeltaCache:
    """LRU of composed deltas, bounded by bytes, keyed by the adapter set (thread-safe).

    The key is the set's (content hash, weight) pairs in canonical order, plus the dtype, device
    and a caller-chosen `base_id` (the base model's hash: the same set resolved against another
    model is another entry). A result larger than `max_bytes` is returned and not kept.
    """

    def __init__(self, max_bytes: int):
        if max_bytes < 0:
            raise ValueError("max_bytes must be >= 0")
        self.max_bytes = int(max_bytes)
        self._entries: OrderedDict[tuple, tuple[dict[str, torch.Tensor], int]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.stats = CacheStats()

    @staticmethod
    def key(items: AdapterSet, *, dtype=torch.float32, device="cpu", base_id: str = "") -> tuple:
        pairs = tuple((a.content_hash, w) for a, w in _ordered(items) if w != 0.0)
        return (base_id, str(dtype), str(torch.device(device)), pairs)

    @property
    def nbytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key) -> dict[str, torch.Tensor] | None:
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                self.stats.misses += 1
                return None
            self._entries.move_to_end(key)
            self.stats.hits += 1
            return entry[0]

    def put(self, key, deltas: dict[str, torch.Tensor]) -> None:
        size = deltas_nbytes(deltas)
        with self._lock:
            if key in self._entries:
                self._bytes -= self._entries.pop(key)[1]
            if size > self.max_bytes:
                self.stats.uncacheable += 1
                return
            while self._entries and self._bytes + size > self.max_bytes:
                _, (_, old) = self._entries.popitem(last=False)
                self._bytes -= old
                self.stats.evictions += 1
            self._entries[key] = (deltas, size)
            self._bytes += size

    def get_or_compose(self, items: AdapterSet, *, base_id: str = "", dtype=torch.float32, device="cpu", **compose_kwargs):
        """Cached `compose(items, dtype=dtype, device=device, **compose_kwargs)`.

        The returned tensors are shared with the cache: read them, do not modify them in place.
        """
        key = self.key(items, dtype=dtype, device=device, base_id=base_id)
        found = self.get(key)
        if found is not None:
            return found
        deltas = compose(items, dtype=dtype, device=device, **compose_kwargs)
        self.put(key, deltas)
        return deltas

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._bytes = 0
