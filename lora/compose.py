"""A set of (adapter, weight) -> one delta per target weight, and a byte-bounded cache of them.

delta[W] = Σᵢ wᵢ · scaleᵢ · upᵢ @ downᵢ, conv deltas reshaped to the kernel. Products and sums
are done in fp32 and cast to the requested dtype once at the end (summing fp16 deltas loses the
small ones). Adapters are summed in a fixed order (by content hash, then weight), not in request
order, so the same set gives bit-identical deltas however a request lists it; refitting A, then
B, then A again needs that.

`merge_into` is the same sum added to a base weight, written straight into a given tensor
(the merged weight an engine is refitted with).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from .canonical import CanonicalAdapter, LoraModule
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


def merge_into(out: torch.Tensor, base: torch.Tensor, terms: Sequence[tuple[LoraModule, float]]) -> torch.Tensor:
    """Write base + Σ coefᵢ·upᵢ@downᵢ (coef = adapter weight × module scale) into `out`; return it.

    `out` has the base's shape and may be an engine's own parameter: the merged weight is
    written in place, with no full-size delta or second copy. Nothing of `out`'s old value is
    read, and the operations are fixed by (base, terms), so the same inputs give the same bits
    whatever `out` held before (refitting A, then B, then A needs that). Pass `terms` in the
    canonical order (`_ordered`).

    An fp32 base is never copied to another fp32 tensor first: the first term is one `addmm`
    from the base into `out` (torch copies base into out, then one GEMM adds the product in
    place), later terms `addmm_`. Any other dtype accumulates in a temporary fp32 copy of the
    base and is cast once at the end (fp16 sums lose the small deltas).
    """
    if out.shape != base.shape:
        raise ValueError(f"out {tuple(out.shape)} and base {tuple(base.shape)} differ")
    if out.data_ptr() == base.data_ptr():
        raise ValueError("out must not be the base itself (its pristine value is read)")
    if not terms:
        return out.copy_(base)
    in_place = out.dtype == torch.float32 and base.dtype == torch.float32
    rows = base.shape[0]
    acc = out.view(rows, -1) if in_place else base.reshape(rows, -1).to(torch.float32, copy=True)  # out.view: a refit target is contiguous
    for i, (module, coef) in enumerate(terms):
        up = module.up.to(out.device, torch.float32).flatten(1)
        down = module.down.to(out.device, torch.float32).flatten(1)
        if i == 0 and in_place:
            torch.addmm(base.reshape(rows, -1), up, down, alpha=coef, out=acc)
        else:
            acc.addmm_(up, down, alpha=coef)
    if not in_place:
        out.copy_(acc.view(out.shape))
    return out


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

    def fits(self, nbytes: int) -> bool:
        """Whether `put` would keep a result of `nbytes` (it evicts older entries to make room)."""
        return nbytes <= self.max_bytes

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

    def make_room(self, nbytes: int) -> list[dict[str, torch.Tensor]]:
        """Evict least recently used entries until a result of `nbytes` fits beside the rest, as
        `put` would; return the evicted entries, so that a caller about to `put` can reuse their
        tensors as buffers (a tensor someone else still holds must not be written)."""
        evicted = []
        with self._lock:
            while self._entries and self._bytes + nbytes > self.max_bytes:
                _, (deltas, old) = self._entries.popitem(last=False)
                self._bytes -= old
                self.stats.evictions += 1
                evicted.append(deltas)
        return evicted

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
