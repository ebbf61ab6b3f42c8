"""Validation against a base model, composition of weighted sets, and the delta cache."""

from __future__ import annotations

import pytest
import torch
from lora_fixtures import apply, bundle, single_torch_thread  # noqa: F401 (fixture)
from safetensors.torch import load_file

from impasto.lora import (
    AdapterMismatchError,
    DeltaCache,
    compose,
    load_adapter,
    match_targets,
    named_weight_shapes_of,
    parse_state_dict,
)
from impasto.lora.hashing import a1111_short_hash, addnet_hash, lora_hashes_infotext


def test_applied_delta_equals_peft_merge_and_unload(tmp_path):
    """base + our delta == peft's merge_and_unload, for every weight of both components."""
    import copy

    b = bundle()
    adapter = load_adapter(b.write_diffusers(tmp_path))
    deltas = compose([(adapter, 1.0)], named_weight_shapes=b.named_weight_shapes())
    ours = apply(b.base_weights(), deltas)
    merged = {f"unet.{k}": v for k, v in copy.deepcopy(b.peft_unet).merge_and_unload().state_dict().items()}
    merged.update({f"text_encoder.{k}": v for k, v in copy.deepcopy(b.peft_te).merge_and_unload().state_dict().items()})
    assert sorted(ours) == sorted(merged)
    for k in merged:
        torch.testing.assert_close(ours[k], merged[k], atol=1e-5, rtol=1e-5, msg=k)


def test_match_resolves_text_model_alias_and_reports(tmp_path):
    b = bundle()
    adapter = load_adapter(b.write_diffusers(tmp_path))
    report = match_targets(adapter, b.named_weight_shapes())
    assert report.ok and not report.unmatched
    t = "text_encoder.text_model.encoder.layers.1.mlp.fc2"
    assert report.resolved[t] == "text_encoder.encoder.layers.1.mlp.fc2.weight"  # transformers 5 flattened CLIPTextModel
    # With the older layout (text_model. present) the same adapter resolves directly.
    old = {k.replace("text_encoder.", "text_encoder.text_model.", 1): v for k, v in b.named_weight_shapes().items()}
    assert match_targets(adapter, old).resolved[t] == "text_encoder.text_model.encoder.layers.1.mlp.fc2.weight"


def test_unmatched_targets_are_an_error_listing_them(tmp_path):
    b = bundle()
    adapter = load_adapter(b.write_diffusers(tmp_path))
    unet_only = named_weight_shapes_of({"unet": b.unet})
    report = match_targets(adapter, unet_only)
    assert not report.ok
    assert "text_encoder.text_model.encoder.layers.0.self_attn.q_proj" in report.errors[0]
    with pytest.raises(AdapterMismatchError, match=r"adapter targets not in the base model: text_encoder\."):
        compose([(adapter, 1.0)], named_weight_shapes=unet_only)
    # ... or a counted warning when the caller asks for that (never silent)
    lenient = match_targets(adapter, unet_only, allow_unmatched=True)
    assert lenient.ok and str(len(lenient.unmatched)) in lenient.warnings[0]


def test_shape_mismatch_is_refused_naming_the_module(tmp_path):
    b = bundle()
    adapter = load_adapter(b.write_diffusers(tmp_path))
    import diffusers

    wider = diffusers.UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=2, sample_size=32, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=48,
    )
    shapes = named_weight_shapes_of({"unet": wider, "text_encoder": b.te})
    with pytest.raises(AdapterMismatchError, match=r"attn2\.to_k: adapter \(64, 32\) vs base \(64, 48\)"):
        compose([(adapter, 1.0)], named_weight_shapes=shapes)


def test_linear_lora_on_1x1_conv_is_accepted():
    """SD 2.x LoRAs (linear proj_in) on SD 1.x (1×1 conv proj_in) and back: A1111 allows it."""
    b = bundle()
    name = "unet.down_blocks.1.attentions.0.proj_in"
    sd = {
        "unet.down_blocks.1.attentions.0.proj_in.lora_A.weight": torch.randn(2, 64),
        "unet.down_blocks.1.attentions.0.proj_in.lora_B.weight": torch.randn(64, 2),
    }
    adapter = parse_state_dict(sd)
    deltas = compose([(adapter, 1.0)], named_weight_shapes=b.named_weight_shapes())
    assert deltas[f"{name}.weight"].shape == (64, 64, 1, 1)


def test_weighted_sum_and_order_independence(tmp_path):
    b = bundle()
    a = load_adapter(b.write_diffusers(tmp_path / "a"))
    k = load_adapter(b.write_kohya(tmp_path / "k.safetensors"))
    other = parse_state_dict({k2: v * 0.5 for k2, v in load_file(tmp_path / "k.safetensors").items() if not k2.endswith(".alpha")})
    shapes = b.named_weight_shapes()
    one = compose([(a, 0.7), (other, -0.3), (k, 0.2)], named_weight_shapes=shapes)
    two = compose([(k, 0.2), (a, 0.7), (other, -0.3)], named_weight_shapes=shapes)
    for n in one:
        assert torch.equal(one[n], two[n]), n  # bit-identical whatever the request order
    da = compose([(a, 1.0)], named_weight_shapes=shapes)
    do = compose([(other, 1.0)], named_weight_shapes=shapes)
    for n in one:
        want = 0.9 * da[n] + (-0.3) * do.get(n, 0)
        torch.testing.assert_close(one[n], want, atol=1e-5, rtol=1e-5)
    half = compose([(a, 1.0)], named_weight_shapes=shapes, dtype=torch.float16)
    assert all(t.dtype == torch.float16 for t in half.values())


def test_merge_into_is_base_plus_compose_whatever_out_held(tmp_path):
    """merge_into writes base + Σ w·scale·up@down into a given tensor (an engine's weight): the
    same values as base + compose's delta, the same bits whatever the tensor held, conv
    weights included; fp16 accumulates in fp32 and is cast once."""
    from impasto.lora.compose import _ordered, merge_into

    b = bundle()
    a = load_adapter(b.write_diffusers(tmp_path / "a"))
    k = load_adapter(b.write_kohya(tmp_path / "k.safetensors"))
    shapes, base = b.named_weight_shapes(), b.base_weights()
    items = [(a, 0.7), (k, -0.2)]
    deltas = compose(items, named_weight_shapes=shapes)
    terms: dict[str, list] = {}
    for adapter, w in _ordered(items):
        for target, name in match_targets(adapter, shapes).resolved.items():
            terms.setdefault(name, []).append((adapter.modules[target], w * adapter.modules[target].scale))
    assert any(base[n].ndim == 4 for n in terms), "the fixture has conv targets"
    for name, t in terms.items():
        once = merge_into(torch.empty_like(base[name]), base[name], t)
        torch.testing.assert_close(once, base[name] + deltas[name], atol=1e-5, rtol=1e-5, msg=name)
        assert torch.equal(merge_into(torch.full_like(base[name], float("nan")), base[name], t), once), name
        half = merge_into(torch.empty_like(base[name], dtype=torch.float16), base[name].half(), t)
        assert half.dtype == torch.float16
        torch.testing.assert_close(half, (base[name].half().float() + deltas[name]).half(), msg=name)  # fp16's own tolerance: cast once
    name = next(iter(terms))
    assert torch.equal(merge_into(torch.empty_like(base[name]), base[name], []), base[name])
    with pytest.raises(ValueError, match="base itself"):
        merge_into(base[name], base[name], terms[name])


def test_delta_cache_is_bounded_by_bytes(tmp_path):
    b = bundle()
    a = load_adapter(b.write_diffusers(tmp_path))
    shapes = b.named_weight_shapes()
    one = compose([(a, 1.0)], named_weight_shapes=shapes)
    size = sum(t.numel() * t.element_size() for t in one.values())
    cache = DeltaCache(max_bytes=int(size * 2.5))
    for w in (1.0, 0.5, 0.25):
        cache.get_or_compose([(a, w)], named_weight_shapes=shapes, base_id="tiny")
    assert len(cache) == 2 and cache.nbytes <= cache.max_bytes and cache.stats.evictions == 1
    again = cache.get_or_compose([(a, 0.25)], named_weight_shapes=shapes, base_id="tiny")
    assert cache.stats.hits == 1
    torch.testing.assert_close(again[next(iter(again))], 0.25 * one[next(iter(again))])
    # evicted entry (weight 1.0, least recently used) is recomputed
    cache.get_or_compose([(a, 1.0)], named_weight_shapes=shapes, base_id="tiny")
    assert cache.stats.misses == 4
    # a result bigger than the budget is returned, not kept
    tiny = DeltaCache(max_bytes=10)
    assert tiny.get_or_compose([(a, 1.0)], named_weight_shapes=shapes) and len(tiny) == 0 and tiny.stats.uncacheable == 1
    # other base model, dtype: other keys
    assert DeltaCache.key([(a, 1.0)], base_id="x") != DeltaCache.key([(a, 1.0)], base_id="y")
    assert DeltaCache.key([(a, 1.0)]) != DeltaCache.key([(a, 1.0)], dtype=torch.float16)


def test_a1111_hash_is_sha256_of_tensor_data(tmp_path):
    import hashlib

    b = bundle()
    path = b.write_kohya(tmp_path / "k.safetensors")
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    assert addnet_hash(path) == hashlib.sha256(raw[8 + n:]).hexdigest()
    adapter = load_adapter(path)
    assert adapter.file_sha256 == addnet_hash(path)
    assert a1111_short_hash(adapter.file_sha256) == adapter.file_sha256[:12]
    # A1111 strips ':' and ',' from the alias
    assert lora_hashes_infotext([("my:lora,x", adapter.file_sha256)]) == f"mylorax: {adapter.file_sha256[:12]}"


def test_compose_without_base_uses_adapter_shapes(tmp_path):
    b = bundle()
    a = load_adapter(b.write_kohya(tmp_path / "k.safetensors"))
    deltas = compose([(a, 1.0)])
    t = "unet.down_blocks.0.resnets.0.conv1"
    assert deltas[f"{t}.weight"].shape == a.modules[t].delta_shape == (32, 32, 3, 3)


def test_embedding_width_is_checked(tmp_path):
    from lora_fixtures import bundle as get_bundle

    from impasto.lora.formats.cloneofsimo import module_tree

    b = get_bundle()
    path, _ = b.write_cloneofsimo(tmp_path / "c.safetensors", token_vec=torch.randn(48))
    a = load_adapter(path, module_trees={"unet": module_tree(b.unet), "text_encoder": module_tree(b.te)})
    report = match_targets(a, b.named_weight_shapes())
    assert not report.ok and "embedding '<s1>' has vectors of width 48, but the base model's text_encoder hidden size is 32" in report.errors[0]
