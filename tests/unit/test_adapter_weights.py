"""Applying adapter sets to engines through refit/restore: exact, never blended, cached."""

from __future__ import annotations

import copy

import pytest
import torch
from lora_fixtures import bundle, single_torch_thread  # noqa: F401 (fixture)

from impasto.backends.torch_backend import TorchUNet
from impasto.core.adapter_registry import AdapterRecord
from impasto.core.adapter_syntax import parse_schedule
from impasto.core.adapter_weights import ActiveAdapter, EngineAdapters, RequestAdapters
from impasto.lora import CanonicalAdapter, DeltaCache, LoraModule, compose, named_weight_shapes_of


def unet_adapter(seed: int, keep_every: int = 1, scale: float = 1.0) -> CanonicalAdapter:
    b = bundle()
    g = torch.Generator().manual_seed(seed)
    modules = {}
    for i, (name, p) in enumerate(n for n in b.unet.named_parameters() if n[0].endswith("to_q.weight") or n[0].endswith("to_v.weight")):
        if i % keep_every:
            continue
        out_f, in_f = p.shape
        modules[f"unet.{name.removesuffix('.weight')}"] = LoraModule(torch.randn(2, in_f, generator=g), scale * torch.randn(out_f, 2, generator=g), 2.0)
    return CanonicalAdapter(modules=modules)


def weights(engine) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in engine.named_weights().items()}


def same(a, b) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture()
def engine():
    return TorchUNet(copy.deepcopy(bundle().unet))


def test_a_b_a_and_restore_are_bit_exact(engine):
    base = weights(engine)
    a, b = unet_adapter(1), unet_adapter(2, keep_every=2)  # b touches half of a's weights
    state = EngineAdapters(engine, "unet", DeltaCache(1 << 30), "tiny")
    assert state.apply([(a, 0.8)]) is not None
    with_a = weights(engine)
    shapes = named_weight_shapes_of({"unet": bundle().unet})
    want = compose([(a, 0.8)], named_weight_shapes=shapes)
    for name, delta in want.items():
        torch.testing.assert_close(with_a[name.removeprefix("unet.")], base[name.removeprefix("unet.")] + delta)
    state.apply([(b, 0.5)])
    with_b = weights(engine)
    untouched_by_b = [n for n in a.modules if n not in b.modules]
    assert untouched_by_b and all(torch.equal(with_b[n.removeprefix("unet.") + ".weight"], base[n.removeprefix("unet.") + ".weight"]) for n in untouched_by_b), "no weight keeps A's value"
    state.apply([(a, 0.8)])
    assert same(weights(engine), with_a)
    state.apply([])
    assert same(weights(engine), base)
    assert state.apply([]) is None and state.apply([(a, 0.0)]) is None, "the empty set (or weight 0) is already applied"


def test_merged_weights_are_cached_and_order_does_not_matter(engine):
    a, b = unet_adapter(1), unet_adapter(2)
    cache = DeltaCache(1 << 30)
    state = EngineAdapters(engine, "unet", cache, "tiny")
    state.apply([(a, 0.5), (b, 1.0)])  # first use: written in the engine, not kept
    first = weights(engine)
    assert len(cache) == 0
    state.apply([])
    state.apply([(b, 1.0), (a, 0.5)])  # second use (same set, other order): composed and kept
    assert len(cache) == 1 and same(weights(engine), first)
    state.apply([])
    hits = cache.stats.hits
    state.apply([(a, 0.5), (b, 1.0)])
    assert cache.stats.hits == hits + 1 and same(weights(engine), first)


def test_a_set_used_once_is_not_kept_but_engines_without_in_place_keep_at_once(engine):
    a = unet_adapter(1)
    state = EngineAdapters(engine, "unet", DeltaCache(1 << 30), "tiny")
    for w in (0.1, 0.2, 0.3):
        state.apply([(a, w)])
    assert len(state.cache) == 0, "one-off sets never evict the ones that recur"
    state.apply([(a, 0.2)])
    assert len(state.cache) == 1
    plain = TorchUNet(copy.deepcopy(bundle().unet))
    plain.refit_in_place = None  # a compiled engine: merged tensors are made anyway
    state = EngineAdapters(plain, "unet", DeltaCache(1 << 30), "tiny")
    state.apply([(a, 0.1)])
    assert len(state.cache) == 1


def test_scheduled_sets_do_not_fill_the_cache(engine):
    a = unet_adapter(1)
    cache = DeltaCache(1 << 30)
    state = EngineAdapters(engine, "unet", cache, "tiny")
    for w in (0.1, 0.2, 0.3):
        state.apply([(a, w)], keep=False)
    assert len(cache) == 0 and state.num_switches == 3


def test_cache_bounded_by_bytes_still_exact(engine):
    a, b = unet_adapter(1), unet_adapter(2)
    state = EngineAdapters(engine, "unet", DeltaCache(0), "tiny")  # nothing fits: always composed
    state.apply([(a, 1.0)])
    with_a = weights(engine)
    state.apply([(b, 1.0)])
    state.apply([(a, 1.0)])
    assert same(weights(engine), with_a)


def test_computed_in_engine_equals_cached_bit_for_bit():
    """A set not kept is computed straight into the torch engine's weights (refit_in_place);
    the same set through the cache (merged tensors, then refit) gives the same bits, for
    every switch of a sequence that drops and adds weights."""
    a, b = unet_adapter(1), unet_adapter(2, keep_every=2)
    direct = EngineAdapters(TorchUNet(copy.deepcopy(bundle().unet)), "unet", DeltaCache(0), "tiny")
    kept = TorchUNet(copy.deepcopy(bundle().unet))
    kept.refit_in_place = None  # so every set goes through the cache at its first use
    cached = EngineAdapters(kept, "unet", DeltaCache(1 << 30), "tiny")
    calls = []
    direct.engine.refit = lambda named: calls.append(named)  # must not be used: nothing is kept
    for items in ([(a, 0.8)], [(b, 0.5)], [(a, 1.0), (b, 0.3)], [(b, 1.0)], [(a, 0.8)]):
        direct.apply(items)
        cached.apply(items)
        assert same(weights(direct.engine), weights(cached.engine)), items
    assert not calls and len(direct.cache) == 0 and len(cached.cache) == 4


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_computed_in_engine_a_b_a_and_restore_are_bit_exact(dtype):
    engine = TorchUNet(copy.deepcopy(bundle().unet), dtype=dtype)
    base = weights(engine)
    a, b = unet_adapter(1), unet_adapter(2, keep_every=2)
    state = EngineAdapters(engine, "unet", DeltaCache(1 << 30), "tiny")
    state.apply([(a, 0.8)], keep=False)  # a scheduled set: not kept, computed in the engine
    with_a = weights(engine)
    assert not same(with_a, base)
    state.apply([(b, 0.5)], keep=False)
    untouched_by_b = [n.removeprefix("unet.") + ".weight" for n in a.modules if n not in b.modules]
    assert all(torch.equal(weights(engine)[n], base[n]) for n in untouched_by_b), "no weight keeps A's value"
    state.apply([(a, 0.8)], keep=False)
    assert same(weights(engine), with_a) and len(state.cache) == 0
    state.apply([])
    assert same(weights(engine), base)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_kept_from_the_engine_equals_merged_tensors_bit_for_bit(dtype):
    """A kept set on the torch engine is computed in the engine, then copied out to the cache:
    its entry holds the same bits as the merged tensors an engine without in-place refit
    builds, and A -> B -> A from the cache (a full cache that reuses evicted entries'
    tensors) gives A's bits again; the empty set gives the base."""
    a, b = unet_adapter(1), unet_adapter(2, keep_every=2)
    engine = TorchUNet(copy.deepcopy(bundle().unet), dtype=dtype)
    base = weights(engine)
    plain = TorchUNet(copy.deepcopy(bundle().unet), dtype=dtype)
    plain.refit_in_place = None
    reference = EngineAdapters(plain, "unet", DeltaCache(1 << 30), "tiny")
    one_set = sum(t.numel() * t.element_size() for n, t in base.items() if f"unet.{n.removesuffix('.weight')}" in a.modules)
    cache = DeltaCache(one_set)  # holds one of A, B (B targets fewer weights): each switch evicts
    state = EngineAdapters(engine, "unet", cache, "tiny")
    for items in ([(a, 0.8)], [(b, 0.5)]):
        state.apply(items)  # first use: not kept
        reference.apply(items)
    seen = []
    for items in ([(a, 0.8)], [(b, 0.5)], [(a, 0.8)], [(b, 0.5)], [(a, 0.8)]):
        state.apply(items)
        reference.apply(items)
        assert same(weights(engine), weights(plain)), items
        (entry,) = [e for e, _ in cache._entries.values()]
        assert same(entry, {n: weights(plain)[n] for n in entry}), items
        seen.append({t.data_ptr() for t in entry.values()})
        del entry  # held here, it would not be reused
    assert seen[2] & seen[0], "the evicted entry's tensors are reused"
    state.apply([])
    assert same(weights(engine), base)


def test_evicted_tensors_held_elsewhere_are_not_overwritten(engine):
    a, b = unet_adapter(1), unet_adapter(2)
    cache = DeltaCache(sum(t.numel() * t.element_size() for n, t in engine.named_weights().items() if f"unet.{n.removesuffix('.weight')}" in a.modules))
    state = EngineAdapters(engine, "unet", cache, "tiny")
    for items in ([(a, 1.0)], [(b, 1.0)], [(a, 1.0)]):
        state.apply(items)
    (held,) = [e for e, _ in cache._entries.values()]  # A's entry, as a caller of get() keeps it
    one = next(iter(held.values()))
    view = one.view(-1)
    before = {n: t.clone() for n, t in held.items()}
    state.apply([(b, 1.0)])  # evicts A: its dict is held, so nothing in it is written
    assert same(held, before) and torch.equal(view, before[next(iter(held))].view(-1))
    del held
    state.apply([(a, 1.0)])  # evicts B (not held): reused; `one` and `view` still held: not
    assert torch.equal(view, before[next(iter(before))].view(-1))


def test_a_failed_write_in_the_engine_restores_the_base(engine):
    base = weights(engine)
    state = EngineAdapters(engine, "unet", DeltaCache(0), "tiny")
    state.apply([(unet_adapter(1), 1.0)])
    real = engine.refit_in_place

    def fails_halfway(names, write):
        done = []

        def write_some(name, param, pristine):
            if len(done) == len(names) // 2:
                raise RuntimeError("out of memory")
            write(name, param, pristine)
            done.append(name)

        real(names, write_some)

    engine.refit_in_place = fails_halfway
    with pytest.raises(RuntimeError, match="out of memory"):
        state.apply([(unet_adapter(2), 1.0)])
    assert state.applied is None and same(weights(engine), base)


def test_one_base_copy_shared_with_the_torch_engine(engine):
    state = EngineAdapters(engine, "unet", DeltaCache(1 << 30), "tiny")
    state.apply([(unet_adapter(1), 1.0)])
    state.apply([(unet_adapter(2), 1.0)], keep=False)
    assert not state._base, "the engine's pristine copies are used, not a second set"


def test_base_values_from_another_engine(engine):
    """A compiled engine without named_weights takes its base values from the torch engine."""
    reference = TorchUNet(copy.deepcopy(bundle().unet))
    a = unet_adapter(1)
    state = EngineAdapters(engine, "unet", DeltaCache(1 << 30), "tiny", base_engine=reference)
    state.apply([(a, 1.0)])
    plain = EngineAdapters(TorchUNet(copy.deepcopy(bundle().unet)), "unet", DeltaCache(1 << 30), "tiny")
    plain.apply([(a, 1.0)])
    assert same(weights(engine), weights(plain.engine))


def test_a_failed_refit_restores_the_base(engine):
    base = weights(engine)
    a = unet_adapter(1)
    state = EngineAdapters(engine, "unet", DeltaCache(1 << 30), "tiny")
    c = unet_adapter(3)
    state.apply([(c, 1.0)])
    state.apply([(a, 1.0)])

    def broken(*args):
        raise RuntimeError("device lost")

    engine.refit_in_place = broken
    with pytest.raises(RuntimeError):
        state.apply([(c, 1.0)])  # its second use: composed in the engine, to be kept
    assert state.applied is None and same(weights(engine), base) and len(state.cache) == 0
    del engine.refit_in_place
    state.apply([(c, 1.0)])  # kept
    state.apply([(a, 1.0)])
    engine.refit = broken
    with pytest.raises(RuntimeError):
        state.apply([(c, 1.0)])  # from the cache, refitted
    assert state.applied is None and same(weights(engine), base)


def record(adapter_id: str) -> AdapterRecord:
    return AdapterRecord(adapter_id, adapter_id, "kohya", (2,), 1, 1, "0" * 64, False, "tiny", ("unet",))


def test_batch_key_separates_sets_and_schedules():
    a, b = unet_adapter(1), unet_adapter(2)

    def req(*items):
        return RequestAdapters(tuple(ActiveAdapter(record(i), i, w, s, m, None) for i, w, s, m in items))

    ab = req(("a", 0.5, None, a), ("b", 1.0, None, b))
    ba = req(("b", 1.0, None, b), ("a", 0.5, None, a))
    assert ab.batch_key("r1") == ba.batch_key("r2"), "the same set in any order shares a batch"
    assert req(("a", 0.5, None, a)).batch_key("r") != ab.batch_key("r") != RequestAdapters().batch_key("r")
    assert req(("a", 0.6, None, a)).batch_key("r") != req(("a", 0.5, None, a)).batch_key("r")
    scheduled = req(("a", 0.0, parse_schedule("0@0,1@1"), a))
    assert scheduled.batch_key("r1") != scheduled.batch_key("r2"), "a schedule runs in its own batch"
    assert [w for _, w in scheduled.unet_set(0.25)] == [0.25]


class LazyRestoreEngine(TorchUNet):
    """Restores only at its next run, as the engine router does: named_weights() right after
    restore() still shows the last set."""

    def restore(self):
        self.pending_restore = True

    def _catch_up(self):
        if getattr(self, "pending_restore", False):
            super().restore()
            self.pending_restore = False

    def refit(self, named):
        self._catch_up()
        super().refit(named)

    def refit_in_place(self, names, write):
        self._catch_up()
        super().refit_in_place(names, write)


class LazyPlainEngine(LazyRestoreEngine):
    """The same, with only the Engine contract, as the router has: no in-place refit, no shared
    pristine copies (adapter_weights keeps its own base copies)."""

    refit_in_place = None
    pristine_weights = None


@pytest.mark.parametrize("lazy_type", [LazyRestoreEngine, LazyPlainEngine])
def test_engines_that_restore_lazily_never_blend(lazy_type):
    eager = TorchUNet(copy.deepcopy(bundle().unet))
    lazy = lazy_type(copy.deepcopy(bundle().unet))
    a, b = unet_adapter(1), unet_adapter(2, keep_every=2)
    s_eager = EngineAdapters(eager, "unet", DeltaCache(0), "tiny")
    s_lazy = EngineAdapters(lazy, "unet", DeltaCache(0), "tiny")
    for items in ([(a, 1.0)], [(b, 0.5)], [(a, 1.0), (b, 0.3)], [], [(b, 1.0)], [(a, 1.0)]):
        s_eager.apply(items)
        s_lazy.apply(items)
        if items:  # right after the empty set the lazy engine still shows the last one, by design
            assert same(weights(eager), weights(lazy))
    assert bool(s_lazy._base) == (lazy_type is LazyPlainEngine)


def test_router_over_torch_only_writes_in_place_and_never_blends():
    """The server wraps every engine in the engine router. With torch alone behind it, the
    router passes the in-place refit and the shared pristine copies through, so a switch that
    is not kept allocates nothing; mixed with kept sets and lazy runs, no weight is blended."""
    from impasto.backends.base import Component
    from impasto.core.engine_router import RoutedEngine

    eager = TorchUNet(copy.deepcopy(bundle().unet))
    torch_engine = TorchUNet(copy.deepcopy(bundle().unet))
    router = RoutedEngine(Component.UNET, [], torch_engine, vae_scale_factor=8)
    assert router.refit_in_place is not None and router.pristine_weights is not None
    a, b = unet_adapter(1), unet_adapter(2, keep_every=2)
    s_eager = EngineAdapters(eager, "unet", DeltaCache(0), "tiny")
    s_router = EngineAdapters(router, "unet", DeltaCache(1 << 30), "tiny")
    assert not s_router._base, "the torch engine's pristine copies are shared, not copied again"
    for items, keep in (([(a, 1.0)], True), ([(b, 0.5)], False), ([(a, 1.0), (b, 0.3)], True),
                        ([(b, 1.0)], True), ([(a, 0.7)], False), ([], True), ([(b, 0.2)], False), ([(a, 1.0)], True)):
        s_eager.apply(items)
        s_router.apply(items, keep=keep)
        router._bring_up_to_date(torch_engine)  # what the router's next run does
        assert same(weights(eager), weights(torch_engine)), items


def test_router_with_compiled_engines_keeps_full_values():
    from impasto.backends.base import Component
    from impasto.core.engine_router import RoutedEngine

    compiled = TorchUNet(copy.deepcopy(bundle().unet))  # stands in for a compiled engine: refit only
    router = RoutedEngine(Component.UNET, [compiled], TorchUNet(copy.deepcopy(bundle().unet)), vae_scale_factor=8)
    assert getattr(router, "refit_in_place", None) is None, "compiled engines need the full values"
