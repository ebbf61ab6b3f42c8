"""Adapters applied to engines: a set of (adapter, weight) -> full weights -> `Engine.refit`.

Talks to engines only through the Engine contract (backends/base.py): `refit(named_weights)` with
full values by torch parameter name (never accumulating), `restore()` for the base, and
`named_weights()` for the base values (a compiled engine without it gets them from the torch
engine of the same model, passed as `base_engine`).

For one engine (`EngineAdapters`):
- the set's merged weights, base + Σ wᵢ·scaleᵢ·upᵢ@downᵢ per target weight, are computed from the
  pristine base (never from the current, refitted values) by `impasto.lora.compose.merge_into`
  (compose's formula, matching and order; one addmm per pair; fp32, non-fp32 cast once), and
  kept in a byte-bounded LRU (`DeltaCache`) keyed by the set's content hashes and weights. So
  refitting A, then B, then A passes A's bytes again: A's image, bit for bit. On an engine with
  `refit_in_place` a set to keep is computed in the engine and copied out to its entry (into
  evicted entries' tensors that nothing else holds, when there are some: no new memory);
- a set that is not kept (a weight schedule's, or larger than the cache) is computed straight
  into an engine that offers `refit_in_place` (the torch engine): the same `merge_into`, so the
  same bits, without building merged tensors and copying them in;
- the empty set is `restore()`: the base, bit for bit;
- switching to a set whose targets do not cover every weight the last one changed restores
  first, so no weight keeps another set's value;
- base values are copied once, before a weight is first refitted (memory: one copy of the
  targeted weights), because an engine may restore lazily (the engine router does); an engine
  with `pristine_weights` (the torch engine) shares the copies it keeps for `restore`.

Per request (`RequestAdapters`): the resolved adapters with their weights or weight schedules,
the per-component sets, the batch key, the infotext hashes, and the textual-inversion tokens the
set brings (`prompt_embeddings`). The infotext lists LoRAs (bundled embeddings or not) under
`Lora hashes` and embedding-only adapters under `TI hashes`, as A1111 lists its embeddings: only
those the prompts used, each with the sha256 of its whole file (lora/hashing.py). A token applies because its adapter is in the request's set,
whatever the adapter's weight: the weight scales LoRA deltas only, as in A1111 (bundled
embeddings ignore the multiplier) and diffusers (`set_adapters` does not touch embeddings).
"""

from __future__ import annotations

import math
import sys
import time
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from impasto.lora import CanonicalAdapter, DeltaCache, LoraModule, lora_hashes_infotext, match_targets
from impasto.lora.compose import _ordered as ordered_items  # the canonical order: by content hash, then weight
from impasto.lora.compose import merge_into

from .adapter_registry import AdapterRecord
from .adapter_syntax import WeightSchedule
from .errors import InvalidArgument, Unavailable
from .prompt_encoding import PromptEmbedding

AdapterSet = list[tuple[CanonicalAdapter, float]]
SEEN_ENTRIES = 4096  # keys only: a few MB at most


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
        self._shapes: dict[str, tuple[int, ...]] | None = None  # read on first use: an engine
        # that cannot list its weights still serves requests without adapters
        self.applied: tuple | None = self.key([])  # cache key of the applied set; None: unknown (a refit failed)
        self._touched: set[str] = set()
        self._base: dict[str, torch.Tensor] = {}  # pristine copies of the weights this object refits
        self.num_switches = 0
        # Sets used before, by key (bounded). A set is kept in the cache from its second use on:
        # keeping costs a copy out of the engine (on SD 1.5, ~1.5x the in-engine write with a
        # full cache, whose evicted tensors are reused; up to ~4x into new memory), which a set
        # used once never earns back, and one-off sets would evict the ones that recur (a doorkeeper, as
        # in TinyLFU's admission).
        self._seen: OrderedDict[tuple, None] = OrderedDict()

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        if self._shapes is None:
            self._shapes = base_weight_shapes(self.base_engine or self.engine, self.component)
        return self._shapes

    def key(self, items: AdapterSet) -> tuple:
        return DeltaCache.key([(a, w) for a, w in items if w != 0.0], base_id=self.base_id)

    def apply(self, items: AdapterSet, *, keep: bool = True) -> float | None:
        """Make `items` the engine's adapter set. Returns the switch time in seconds, or None if
        it was already applied. `keep=False` does not put the merged weights in the cache (a
        weight schedule makes a new set at most steps; caching those would evict the sets
        that recur)."""
        items = [(a, float(w)) for a, w in items if w != 0.0]
        key = self.key(items)
        if key == self.applied:
            return None
        started = time.perf_counter()
        try:
            self._switch(key, items, keep)
        except BaseException:
            self.applied = None
            self._touched = set()
            self.engine.restore()  # back to a known state before the error goes up
            raise
        self.applied = key
        self.num_switches += 1
        return time.perf_counter() - started

    def _switch(self, key: tuple, items: AdapterSet, keep: bool) -> None:
        if not items:
            self.engine.restore()
            self._touched = set()
            return
        merged = self.cache.get(key)
        if merged is None:
            plan = self._plan(items)
            keep = keep and self._used_before(key)
            if self._writes_in_place:
                if keep and self.cache.fits(self._nbytes(plan)):
                    # Kept: computed in the engine (the first use's path), then each weight
                    # copied out to the cache entry. The copies go into the tensors of the
                    # entries evicted to make room when nothing else holds them (a full cache,
                    # the steady state): no new memory. New memory costs a page fault per 4 KiB:
                    # SD 1.5, 128 targets, 357 MB, 1 thread: a copy ~24 ms into memory in use,
                    # ~125 ms into new memory. benchmarks/lora_switch.py, full cache: 175 ms
                    # before (entry built as new tensors, then refitted), 63-101 ms now (merge
                    # in the engine 50-68 ms + one copy).
                    spare = _unshared_buffers(self.cache.make_room(self._nbytes(plan)))
                    self.cache.put(key, self._merge_in_engine(plan, copy_out=True, spare=spare))
                else:
                    # Not kept: no merged tensors at all, the engine's own weights are computed.
                    self._merge_in_engine(plan)
                return
            merged = self._merge(plan)
            if keep:
                self.cache.put(key, merged)
        if not self._touched <= merged.keys():
            self.engine.restore()  # a weight the last set changed and this one does not
        self.engine.refit(merged)
        self._touched = set(merged)

    def _used_before(self, key: tuple) -> bool:
        """True from a set's second use on. Only engines that can write in place wait: for the
        others the merged tensors are made anyway, so they are kept at once."""
        if not self._writes_in_place:
            return True
        if key in self._seen:
            self._seen.move_to_end(key)  # an LRU of sets seen: one evicted from the cache
            return True  # and used again is kept again at once
        self._seen[key] = None
        while len(self._seen) > SEEN_ENTRIES:
            self._seen.popitem(last=False)
        return False

    @property
    def _writes_in_place(self) -> bool:
        # The torch engine can take values computed straight into its parameters; an engine
        # that restores lazily (the router) or reads its base elsewhere goes through refit.
        return self.base_engine is None and getattr(self.engine, "refit_in_place", None) is not None

    def _plan(self, items: AdapterSet) -> dict[str, list[tuple[LoraModule, float]]]:
        """{torch name: [(module, weight·scale), ...]}: `compose`'s matching and order (adapters
        by content hash then weight, each adapter's targets in its own order)."""
        prefix = len(self.component) + 1
        plan: dict[str, list[tuple[LoraModule, float]]] = {}
        for adapter, weight in ordered_items(items):
            report = match_targets(adapter, self.shapes, raise_on_error=True)
            for target, full_name in report.resolved.items():
                module = adapter.modules[target]
                plan.setdefault(full_name[prefix:], []).append((module, weight * module.scale))
        return plan

    def _nbytes(self, plan: Mapping[str, object]) -> int:
        current = self.engine.named_weights()
        return sum(current[name].numel() * current[name].element_size() for name in plan)

    def _base_values(self, names) -> dict[str, torch.Tensor]:
        """Pristine values of `names`. From `base_engine` when there is one (never refitted);
        else the engine's own pristine copies when it shares them (the torch engine: one base
        copy, not two); else from a copy taken before this object first refits a weight: an
        engine's `named_weights()` after `restore()` may still show the last set (the engine
        router restores lazily, at its next run), so it is read only for weights never refitted."""
        if self.base_engine is not None:
            current = self.base_engine.named_weights()
            return {n: current[n] for n in names}
        pristine = getattr(self.engine, "pristine_weights", None)
        if pristine is not None:
            return pristine(list(names))
        missing = [n for n in names if n not in self._base]
        if missing:
            current = self.engine.named_weights()
            for n in missing:
                self._base[n] = current[n].detach().clone()
        return {n: self._base[n] for n in names}

    def _merge(self, plan: Mapping[str, list[tuple[LoraModule, float]]]) -> dict[str, torch.Tensor]:
        """{torch name: base + Σ wᵢ·scaleᵢ·upᵢ@downᵢ} as new tensors (to cache and refit), by
        `merge_into`: one addmm per pair from the pristine base, no full-size delta."""
        base = self._base_values(plan)
        return {name: merge_into(torch.empty_like(base[name], memory_format=torch.contiguous_format), base[name], terms) for name, terms in plan.items()}

    def _merge_in_engine(self, plan: Mapping[str, list[tuple[LoraModule, float]]], *, copy_out: bool = False, spare=None) -> dict[str, torch.Tensor] | None:
        """The same values as `_merge` (the same `merge_into`, bit for bit), computed straight
        into the engine's parameters: no merged tensors to allocate and copy in. Weights the last
        set changed and this one does not are written back to the base in the same call (no
        full restore). `copy_out`: also return a copy of each merged weight (to keep), taken
        right after it is written, while it is still in the CPU's caches: what the engine runs,
        so a cached A refitted later gives A's bits again. `spare`: {(shape, dtype, device):
        [tensors]} to copy into before allocating (`_unshared_buffers`)."""
        leftover = sorted(self._touched - plan.keys())
        merged: dict[str, torch.Tensor] = {}

        def write(name, param, pristine):
            merge_into(param, pristine, plan.get(name, ()))
            if copy_out and name in plan:
                reuse = (spare or {}).get((tuple(param.shape), param.dtype, param.device))
                merged[name] = reuse.pop().copy_(param) if reuse else param.clone(memory_format=torch.contiguous_format)

        self.engine.refit_in_place([*plan, *leftover], write)
        self._touched = set(plan)
        return {name: merged[name] for name in plan} if copy_out else None


def _unshared_buffers(entries: list[dict[str, torch.Tensor]]) -> dict[tuple, list[torch.Tensor]]:
    """The contiguous tensors of evicted cache entries that nothing else refers to, by (shape,
    dtype, device): safe to overwrite. A tensor handed out before may still be held (the engine
    router keeps refitted values for its compiled engines, a caller of `get_or_compose` may keep
    its result, a view or numpy array may share the storage): the Python object's references and
    the storage's users tell, and such a tensor is left alone (freed when its holder drops it)."""
    use_count = getattr(torch._C, "_storage_Use_Count", None)
    if use_count is None:
        return {}

    def users(t: torch.Tensor) -> int:
        return use_count(t.untyped_storage()._cdata)

    # The counts of objects that no one else holds, taken the same way as below (one local name
    # plus getrefcount's own argument), rather than a constant: what getrefcount includes has
    # changed between Python versions, and a count too low here would overwrite a held tensor.
    probe_tensor, probe_dict = torch.empty(1), {}
    alone = users(probe_tensor)
    tensor_alone, dict_alone = sys.getrefcount(probe_tensor), sys.getrefcount(probe_dict)
    spare: dict[tuple, list[torch.Tensor]] = {}
    while entries:
        entry = entries.pop()
        if sys.getrefcount(entry) != dict_alone:  # the dict itself is held elsewhere
            continue
        while entry:
            _, t = entry.popitem()
            if sys.getrefcount(t) == tensor_alone and users(t) == alone and t.is_contiguous() and t.storage_offset() == 0 and t.untyped_storage().nbytes() == t.numel() * t.element_size():
                spare.setdefault((tuple(t.shape), t.dtype, t.device), []).append(t)
    return spare


class ModelAdapters:
    """The UNet's and the text encoder's adapter state of one loaded model.

    `base_engines` ({"unet": engine, ...}) names, for an engine that cannot list its weights
    (a compiled one), a torch engine of the same model to read base values from.
    """

    def __init__(self, model, cache: DeltaCache, base_engines: Mapping | None = None):
        engines, base = model.engines, dict(base_engines or {})
        self.unet = EngineAdapters(engines.unet, "unet", cache, model.entry.sha256, base.get("unet"))
        self.text_encoder = EngineAdapters(engines.text_encoder, "text_encoder", cache, model.entry.sha256, base.get("text_encoder"))


@dataclass(frozen=True)
class ActiveAdapter:
    """One adapter of one request: the record, its per-component views, the weight or schedule."""

    record: AdapterRecord
    alias: str  # the name the request used (A1111 writes it in `Lora hashes` / `TI hashes`)
    weight: float
    schedule: WeightSchedule | None
    unet: CanonicalAdapter | None
    text_encoder: CanonicalAdapter | None
    schedule_field: str = ""  # the request field that gave the schedule (errors name it)

    def weight_at(self, fraction: float) -> float:
        return self.schedule.at(fraction) if self.schedule is not None else self.weight


@dataclass(frozen=True)
class RequestAdapters:
    items: tuple[ActiveAdapter, ...] = ()
    _text_key: tuple = field(default=(), compare=False)
    # Adapters (ids) whose vectors the tokenized prompts hold (`prompt_encoding.vector_sources`).
    used_embeddings: frozenset[str] = field(default=frozenset(), compare=False)

    @property
    def has_schedule(self) -> bool:
        return any(a.schedule is not None for a in self.items)

    def check_schedule_cost(self, unet_engine, shape, shapes: Mapping[str, tuple[int, ...]]) -> None:
        """Refuse a weight schedule where refitting before every step would cost more than the
        step (engine_router.SCHEDULE_MAX_REFIT_PER_STEP): every step refits all the set's UNet
        targets. `shape`: the request's UNet call (it runs alone); `shapes`: base_weight_shapes."""
        refusal = getattr(unet_engine, "schedule_refusal", None)
        if not self.has_schedule or refusal is None:
            return
        names = {n for a in self.items if a.unet is not None for n in match_targets(a.unet, shapes).resolved.values()}
        reason = refusal(shape, sum(math.prod(shapes[n]) for n in names))
        if reason:
            scheduled = next(a for a in self.items if a.schedule is not None)
            raise Unavailable(f"{scheduled.schedule_field or 'weight_schedule'}: {reason}; use a constant weight for '{scheduled.alias}'")

    def unet_set(self, fraction: float) -> AdapterSet:
        return [(a.unet, a.weight_at(fraction)) for a in self.items if a.unet is not None]

    def _text_lora(self) -> list[ActiveAdapter]:
        # A text-encoder view may hold embeddings alone; only LoRA modules are refitted.
        return [a for a in self.items if a.text_encoder is not None and a.text_encoder.modules]

    def text_encoder_set(self) -> AdapterSet:
        # The text encoder runs once, before the first step: a schedule's weight at 0.
        return [(a.text_encoder, a.weight_at(0.0)) for a in self._text_lora()]

    def text_key(self) -> tuple:
        """What the text embeddings depend on (the embedding cache's adapter key). Injected
        vectors are not in it: a chunk names its own (prompt_encoding.InjectedVector)."""
        return tuple(sorted((a.record.id, a.weight_at(0.0)) for a in self._text_lora() if a.weight_at(0.0) != 0.0))

    def prompt_embeddings(self) -> dict[str, PromptEmbedding]:
        """{token: its vectors} of every adapter in the set (see the module docstring: the
        weight does not scale them). Two adapters with one token (case-insensitively, as prompts
        are matched) are refused: which vectors were meant cannot be known."""
        found: dict[str, PromptEmbedding] = {}
        owner: dict[str, ActiveAdapter] = {}
        for a in self.items:
            if a.text_encoder is None:
                continue
            for token, per_component in a.text_encoder.embeddings.items():
                other = owner.get(token.lower())
                if other is not None:
                    raise InvalidArgument(
                        "adapters",
                        f"adapters '{other.alias}' and '{a.alias}' both define the embedding token {token!r}; use one of them per request",
                    )
                owner[token.lower()] = a
                found[token] = PromptEmbedding(token, a.record.id, per_component["text_encoder"])
        return found

    def batch_key(self, request_id: str) -> tuple:
        """Requests share a UNet call only with the same UNet set; a schedule runs alone."""
        if self.has_schedule:
            return ("schedule", request_id)
        return tuple(sorted((a.record.id, a.weight) for a in self.items if a.unet is not None and a.weight != 0.0))

    def infotext(self) -> dict[str, str]:
        loras = [(a.alias, a.record.sha256) for a in self.items if not a.record.is_embedding_only]
        embeddings = [
            (a.alias, a.record.whole_file_sha256)
            for a in self.items
            if a.record.is_embedding_only and a.record.id in self.used_embeddings
        ]
        # TI hashes have the Lora hashes layout (lora/hashing.py); an empty value is left out.
        fields = {"Lora hashes": lora_hashes_infotext(loras), "TI hashes": lora_hashes_infotext(embeddings)}
        return {key: value for key, value in fields.items() if value}


NO_ADAPTERS = RequestAdapters()


def merged_nbytes(merged: Mapping[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in merged.values())
