"""Adapters applied to engines: a set of (adapter, weight) -> full weights -> `Engine.refit`.

Talks to engines only through the Engine contract (backends/base.py): `refit(named_weights)` with
full values by torch parameter name (never accumulating), `restore()` for the base, and
`named_weights()` for the base values (a compiled engine without it gets them from the torch
engine of the same model, passed as `base_engine`).

For one engine (`EngineAdapters`):
- the set's merged weights, base + Σ wᵢ·scaleᵢ·upᵢ@downᵢ per target weight, are computed from the
  pristine base (never from the current, refitted values), with `impasto.lora.compose` in fp32
  and cast once, and kept in a byte-bounded LRU (`DeltaCache`) keyed by the set's content hashes
  and weights. So refitting A, then B, then A passes A's bytes again: A's image, bit for bit;
- the empty set is `restore()`: the base, bit for bit;
- switching to a set whose targets do not cover every weight the last one changed restores
  first, so no weight keeps another set's value.

Per request (`RequestAdapters`): the resolved adapters with their weights or weight schedules,
the per-component sets, the batch key and the infotext hashes.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from impasto.lora import CanonicalAdapter, DeltaCache, compose, lora_hashes_infotext

from .adapter_registry import AdapterRecord
from .adapter_syntax import WeightSchedule
from .errors import Unavailable

AdapterSet = list[tuple[CanonicalAdapter, float]]


def base_weight_shapes(engine, component: str) -> dict[str, tuple[int, ...]]:
    """{"<component>.<torch name>": shape} of an engine's weights (what `match_targets` checks)."""
    named = getattr(engine, "named_weights", None)
    if named is None:
        raise Unavailable(f"the {component} engine cannot list its weights (no named_weights); LoRA needs the torch engine of the same model")
    return {f"{component}.{name}": tuple(w.shape) for name, w in named().items()}


class EngineAdapters:
    """The adapter set applied to one engine, and the switch to another set."""

    def __init__(self, engine, component: str, cache: DeltaCache, base_id: str, base_engine=None):
        self.engine = engine
        self.component = component
        self.cache = cache
        self.base_id = f"{base_id}:{component}:merged"
        # Where base values come from: the engine itself (restored first), or a torch engine of
        # the same model that is never refitted (for compiled engines without named_weights).
        self.base_engine = base_engine
        self.shapes = base_weight_shapes(base_engine or engine, component)
        self.applied: tuple | None = self.key([])  # cache key of the applied set; None: unknown (a refit failed)
        self._touched: set[str] = set()
        self.num_switches = 0

    def key(self, items: AdapterSet) -> tuple:
        return DeltaCache.key([(a, w) for a, w in items if w != 0.0], base_id=self.base_id)

    def apply(self, items: AdapterSet) -> float | None:
        """Make `items` the engine's adapter set. Returns the switch time in seconds, or None if
        it was already applied."""
        items = [(a, float(w)) for a, w in items if w != 0.0]
        key = self.key(items)
        if key == self.applied:
            return None
        started = time.perf_counter()
        try:
            self._switch(key, items)
        except BaseException:
            self.applied = None
            self._touched = set()
            self.engine.restore()  # back to a known state before the error goes up
            raise
        self.applied = key
        self.num_switches += 1
        return time.perf_counter() - started

    def _switch(self, key: tuple, items: AdapterSet) -> None:
        if not items:
            self.engine.restore()
            self._touched = set()
            return
        merged = self.cache.get(key)
        restored = False
        if merged is None:
            if self.base_engine is None and self._touched:
                self.engine.restore()  # read the base, not the last set's weights
                self._touched, restored = set(), True
            merged = self._merge(items)
            self.cache.put(key, merged)
        if not restored and not self._touched <= merged.keys():
            self.engine.restore()
        self.engine.refit(merged)
        self._touched = set(merged)

    def _merge(self, items: AdapterSet) -> dict[str, torch.Tensor]:
        base = (self.base_engine or self.engine).named_weights()
        deltas = compose(items, named_weight_shapes=self.shapes, dtype=torch.float32)
        merged = {}
        prefix = len(self.component) + 1
        for full_name, delta in deltas.items():
            name = full_name[prefix:]
            w = base[name]
            merged[name] = (w.float() + delta.to(w.device)).to(w.dtype)
        return merged


class ModelAdapters:
    """The UNet's and the text encoder's adapter state of one loaded model."""

    def __init__(self, model, cache: DeltaCache):
        engines = model.engines
        self.unet = EngineAdapters(engines.unet, "unet", cache, model.entry.sha256)
        self.text_encoder = EngineAdapters(engines.text_encoder, "text_encoder", cache, model.entry.sha256)


@dataclass(frozen=True)
class ActiveAdapter:
    """One adapter of one request: the record, its per-component views, the weight or schedule."""

    record: AdapterRecord
    alias: str  # the name the request used (A1111 writes it in `Lora hashes`)
    weight: float
    schedule: WeightSchedule | None
    unet: CanonicalAdapter | None
    text_encoder: CanonicalAdapter | None

    def weight_at(self, fraction: float) -> float:
        return self.schedule.at(fraction) if self.schedule is not None else self.weight


@dataclass(frozen=True)
class RequestAdapters:
    items: tuple[ActiveAdapter, ...] = ()
    _text_key: tuple = field(default=(), compare=False)

    @property
    def has_schedule(self) -> bool:
        return any(a.schedule is not None for a in self.items)

    def unet_set(self, fraction: float) -> AdapterSet:
        return [(a.unet, a.weight_at(fraction)) for a in self.items if a.unet is not None]

    def text_encoder_set(self) -> AdapterSet:
        # The text encoder runs once, before the first step: a schedule's weight at 0.
        return [(a.text_encoder, a.weight_at(0.0)) for a in self.items if a.text_encoder is not None]

    def text_key(self) -> tuple:
        """What the text embeddings depend on (the embedding cache's adapter key)."""
        return tuple(sorted((a.record.id, a.weight_at(0.0)) for a in self.items if a.text_encoder is not None and a.weight_at(0.0) != 0.0))

    def batch_key(self, request_id: str) -> tuple:
        """Requests share a UNet call only with the same UNet set; a schedule runs alone."""
        if self.has_schedule:
            return ("schedule", request_id)
        return tuple(sorted((a.record.id, a.weight) for a in self.items if a.unet is not None and a.weight != 0.0))

    def infotext(self) -> dict[str, str]:
        if not self.items:
            return {}
        return {"Lora hashes": lora_hashes_infotext([(a.alias, a.record.sha256) for a in self.items])}


NO_ADAPTERS = RequestAdapters()


def merged_nbytes(merged: Mapping[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in merged.values())
