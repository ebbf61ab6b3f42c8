"""The toolbox: merge (cat exact, linear = peft's, svd), fuse into a folder, extract it back, CLI."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from lora_fixtures import Bundle, apply, assert_deltas_close, bundle, peft_deltas, single_torch_thread, to_sgm_name  # noqa: F401 (fixture)

from impasto.lora import (
    AdapterFormatError,
    compose,
    extract_lora_from_folders,
    fuse_into_folder,
    load_adapter,
    merge_cat,
    merge_linear,
    merge_svd,
)
from impasto.lora.cli import main
from impasto.lora.model_folder import read_weights


@pytest.fixture(scope="module")
def two(tmp_path_factory):
    """Two adapters with the same targets and ranks, saved by peft from one PeftModel, plus peft's
    own linear mix of them."""
    b = Bundle(seed=7)
    pm = b.peft_unet
    torch.manual_seed(11)
    pm.add_adapter("other", b.unet_config)
    pm.add_weighted_adapter(["default", "other"], [0.6, -0.4], "mix", combination_type="linear")
    pm.set_adapter("mix")
    peft_linear = {f"unet.{k}": v for k, v in peft_deltas(pm).items()}
    folder = tmp_path_factory.mktemp("two")
    pm.save_pretrained(str(folder), selected_adapters=["default", "other"])
    a = load_adapter(folder)
    o = load_adapter(folder / "other")
    return b, a, o, peft_linear


def deltas(adapter, b):
    return compose([(adapter, 1.0)], named_weight_shapes=b.named_weight_shapes())


def test_merge_cat_is_exact(two):
    b, a, o, _ = two
    merged = merge_cat([(a, 0.6), (o, -0.4)])
    want = compose([(a, 0.6), (o, -0.4)], named_weight_shapes=b.named_weight_shapes())
    assert_deltas_close(deltas(merged, b), want)
    t = "unet.mid_block.attentions.0.transformer_blocks.0.attn1.to_q"
    assert merged.modules[t].rank == a.modules[t].rank + o.modules[t].rank


def test_merge_linear_equals_peft_linear_and_has_cross_terms(two):
    b, a, o, peft_linear = two
    merged = merge_linear([(a, 0.6), (o, -0.4)])
    assert_deltas_close(deltas(merged, b), peft_linear, atol=1e-5, rtol=1e-4)
    exact = compose([(a, 0.6), (o, -0.4)], named_weight_shapes=b.named_weight_shapes())
    diff = max((deltas(merged, b)[k] - exact[k]).abs().max().item() for k in exact)
    assert diff > 1e-2  # the cross terms: not the weighted sum of the deltas


def test_merge_svd_exact_at_full_rank_and_best_below(two):
    b, a, o, _ = two
    exact = compose([(a, 0.6), (o, -0.4)], named_weight_shapes=b.named_weight_shapes())
    full = merge_svd([(a, 0.6), (o, -0.4)], rank=8)
    assert_deltas_close(deltas(full, b), exact, atol=1e-4, rtol=1e-4)
    low = deltas(merge_svd([(a, 0.6), (o, -0.4)], rank=2), b)
    k = "unet.mid_block.attentions.0.transformer_blocks.0.attn1.to_q.weight"
    s = torch.linalg.svdvals(exact[k].flatten(1))
    err = torch.linalg.matrix_norm(low[k].flatten(1) - exact[k].flatten(1))
    torch.testing.assert_close(err, s[2:].norm(), atol=1e-4, rtol=1e-4)  # Eckart–Young


def test_merge_linear_refuses_unequal_ranks(two, tmp_path):
    b, a, _, _ = two
    other = load_adapter(bundle().write_kohya(tmp_path / "k.safetensors"))
    cut = merge_svd([(other, 1.0)], rank=1)
    with pytest.raises(AdapterFormatError, match="equal ranks"):
        merge_linear([(a, 1.0), (cut, 1.0)])


def _model_folder(b, folder):
    b.unet.save_pretrained(str(folder / "unet"))
    b.te.save_pretrained(str(folder / "text_encoder"))
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    return folder


def test_fuse_then_extract_recovers_the_delta(tmp_path):
    b = bundle()
    adapter = load_adapter(b.write_diffusers(tmp_path / "a"))
    base = _model_folder(b, tmp_path / "base")
    out = fuse_into_folder(base, [(adapter, 0.8)], tmp_path / "fused")
    assert (out / "model_index.json").exists() and not list(tmp_path.glob(".fused*"))
    fused = read_weights(out)
    want = apply(read_weights(base), {k: 0.8 * v for k, v in b.deltas.items()})
    assert sorted(fused) == sorted(want)
    for k in want:
        torch.testing.assert_close(fused[k], want[k], atol=1e-5, rtol=1e-5, msg=k)
    # extract at the adapter's rank, no clamp: the delta comes back
    ex = extract_lora_from_folders(base, out, rank=4, clamp_quantile=None)
    assert_deltas_close(deltas(ex, b), {k: 0.8 * v for k, v in b.deltas.items()}, atol=2e-5, rtol=1e-4)
    # kohya's default clamp (0.99 quantile) trades a little accuracy for no outliers
    clamped = deltas(extract_lora_from_folders(base, out, rank=4), b)
    num = sum((clamped[k] - 0.8 * v).norm() ** 2 for k, v in b.deltas.items()) ** 0.5
    den = sum((0.8 * v).norm() ** 2 for v in b.deltas.values()) ** 0.5
    assert 0 < num / den < 0.25
    # fusing over an existing folder needs overwrite; the model folder itself is never the output
    with pytest.raises(FileExistsError):
        fuse_into_folder(base, [(adapter, 1.0)], out)
    with pytest.raises(ValueError):
        fuse_into_folder(base, [(adapter, 1.0)], base, overwrite=True)


def test_cli_convert_merge_inspect_extract_fuse(tmp_path, capsys):
    b = bundle()
    src = b.write_kohya(tmp_path / "src.safetensors")
    base = _model_folder(b, tmp_path / "base")
    assert main(["lora", "convert", str(src), str(tmp_path / "d.safetensors"), "--to", "diffusers"]) == 0
    assert main(["lora", "convert", str(tmp_path / "d.safetensors"), str(tmp_path / "peft"), "--to", "peft"]) == 0
    assert (tmp_path / "peft" / "unet" / "adapter_model.safetensors").exists()
    assert main(["lora", "merge", str(tmp_path / "m.safetensors"), "--adapter", f"{src}:0.5", "--adapter", str(tmp_path / "d.safetensors"), "--mode", "cat"]) == 0
    assert main(["lora", "fuse", str(base), str(tmp_path / "fused"), "--adapter", f"{src}:1"]) == 0
    assert main(["lora", "extract", str(base), str(tmp_path / "fused"), str(tmp_path / "x.safetensors"), "--rank", "4"]) == 0
    capsys.readouterr()
    assert main(["lora", "inspect", str(tmp_path / "m.safetensors"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["format"] == "kohya" and info["components"] == ["unet", "text_encoder"]
    # cat of the same adapter twice: every rank doubles (unet 4 -> 8, to_k 2 -> 4, text encoder 2 -> 4)
    assert set(info["ranks"]) == {"4", "8"} and sum(info["ranks"].values()) == info["num_targets"]
    assert len(info["a1111_short_hash"]) == 12
    merged = load_adapter(tmp_path / "m.safetensors")
    src_a = load_adapter(src)
    assert_deltas_close(deltas(merged, b), compose([(src_a, 1.5)], named_weight_shapes=b.named_weight_shapes()), atol=2e-5, rtol=1e-4)
    # errors come out as one line and exit code 2
    torch.save({}, tmp_path / "bad.pt")
    assert main(["lora", "inspect", str(tmp_path / "bad.pt")]) == 2
    assert "pickle checkpoints are refused" in capsys.readouterr().err


def test_cli_reads_cloneofsimo_files_with_model(tmp_path, capsys):
    """cloneofsimo files number their modules in the model's order: the CLI lists the modules of
    `--model`'s configs, and without it says to pass it."""
    b = bundle()
    src, ref = b.write_cloneofsimo(tmp_path / "c.safetensors")
    base = _model_folder(b, tmp_path / "base")
    capsys.readouterr()
    assert main(["lora", "inspect", str(src)]) == 2
    assert "pass --model DIR" in capsys.readouterr().err
    assert main(["lora", "inspect", str(src), "--json", "--model", str(base)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["format"] == "cloneofsimo" and info["num_targets"] == len(ref)
    out = tmp_path / "k.safetensors"
    assert main(["lora", "convert", str(src), str(out), "--to", "kohya", "--model", str(base)]) == 0
    assert_deltas_close(deltas(load_adapter(out), b), ref)


def test_cli_maps_kohya_sgm_names_by_the_model_folders_unet(tmp_path, capsys):
    """A kohya SDXL file numbers the UNet's blocks the SGM way, which depends on the UNet's
    layers_per_block. With --model the CLI reads it from the folder's UNet config (here 1, not
    the usual 2): the file converts onto the model's own modules, with no warning. Without it the
    names are mapped for 2, and the warning says so."""
    b = Bundle(seed=3, layers_per_block=1)
    kohya = load_file(b.write_kohya(tmp_path / "k.safetensors"))
    sgm = {}
    for key, value in kohya.items():
        name, _, suffix = key.partition(".")
        if "samplers" not in name:  # only the attention/resnet blocks are renumbered
            sgm[f"{to_sgm_name(name, layers_per_block=1)}.{suffix}"] = value
    assert any("input_blocks_" in k for k in sgm)
    src = tmp_path / "sgm.safetensors"
    save_file(sgm, str(src))
    base = _model_folder(b, tmp_path / "base")

    capsys.readouterr()
    assert main(["lora", "inspect", str(src), "--json"]) == 0
    assert any("layers_per_block=2" in w for w in json.loads(capsys.readouterr().out)["warnings"])
    assert main(["lora", "inspect", str(src), "--json", "--model", str(base)]) == 0
    assert not any("layers_per_block" in w for w in json.loads(capsys.readouterr().out)["warnings"])

    out = tmp_path / "d.safetensors"
    assert main(["lora", "convert", str(src), str(out), "--to", "diffusers", "--model", str(base)]) == 0
    converted = deltas(load_adapter(out), b)
    expected = {k: v for k, v in b.deltas.items() if k.startswith("text_encoder.") or "samplers" not in k}
    assert_deltas_close(converted, expected)
