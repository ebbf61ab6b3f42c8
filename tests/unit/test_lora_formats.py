"""Every format parses to the same canonical deltas as peft computes; refusals name what they refuse."""

from __future__ import annotations

import json
import re

import pytest
import torch
from lora_fixtures import assert_deltas_close, bundle, single_torch_thread, to_sgm_name  # noqa: F401 (fixture)
from safetensors.torch import load_file, save_file

from impasto.lora import AdapterFormatError, compose, detect_format, load_adapter, parse_state_dict
from impasto.lora.formats import cloneofsimo
from impasto.lora.files import read_safetensors
from impasto.lora.formats._common import pattern_key


def deltas_in_base_names(adapter, b):
    return compose([(adapter, 1.0)], named_weight_shapes=b.named_weight_shapes())


def test_diffusers_file_matches_peft(tmp_path):
    b = bundle()
    adapter = load_adapter(b.write_diffusers(tmp_path))
    assert adapter.source_format == "diffusers"
    assert_deltas_close(deltas_in_base_names(adapter, b), b.deltas)
    # rank_pattern / alpha_pattern from the metadata were honoured
    k = "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_k"
    ff = "unet.down_blocks.1.attentions.0.transformer_blocks.0.ff.net.2"
    assert adapter.modules[k].rank == 2 and adapter.modules[ff].alpha == 3
    # text-encoder targets carry text_model. whatever transformers' layout
    assert "text_encoder.text_model.encoder.layers.0.self_attn.q_proj" in adapter.modules


def test_peft_folder_matches_peft(tmp_path):
    b = bundle()
    adapter = load_adapter(b.write_peft_folder(tmp_path / "u"))
    assert adapter.source_format == "peft" and adapter.components == ["unet"]
    te = load_adapter(b.write_peft_folder(tmp_path / "t", "text_encoder"))
    assert te.components == ["text_encoder"]
    got = compose([(adapter, 1.0), (te, 1.0)], named_weight_shapes=b.named_weight_shapes())
    assert_deltas_close(got, b.deltas)


def test_rslora_scale(tmp_path):
    from lora_fixtures import Bundle

    b = Bundle(seed=3, unet_kw=dict(use_rslora=True, rank_pattern={}, alpha_pattern={}))
    adapter = load_adapter(b.write_peft_folder(tmp_path / "u"))
    got = compose([(adapter, 1.0)], named_weight_shapes=b.named_weight_shapes())
    assert_deltas_close(got, {k: v for k, v in b.deltas.items() if k.startswith("unet.")})


def test_kohya_file_matches_peft(tmp_path):
    b = bundle()
    adapter = load_adapter(b.write_kohya(tmp_path / "k.safetensors"))
    assert adapter.source_format == "kohya"
    assert_deltas_close(deltas_in_base_names(adapter, b), b.deltas)
    # conv LoRA: down k×k, up 1×1
    conv = adapter.modules["unet.down_blocks.0.resnets.0.conv1"]
    assert conv.down.shape[2:] == (3, 3) and conv.up.shape[2:] == (1, 1)


def test_kohya_alpha_rules(tmp_path):
    b = bundle()
    sd = load_file(b.write_kohya(tmp_path / "k.safetensors"))
    name = "lora_unet_down_blocks_1_attentions_0_proj_in"
    target = "unet.down_blocks.1.attentions.0.proj_in"
    base = parse_state_dict(sd).modules[target].delta()
    rank = sd[f"{name}.lora_down.weight"].shape[0]
    # alpha = 2·rank doubles the delta; a missing alpha is scale 1; alpha 0 is kohya's "= rank", with a warning
    sd[f"{name}.alpha"] = torch.tensor(2.0 * rank)
    torch.testing.assert_close(parse_state_dict(sd).modules[target].delta(), 2 * base)
    del sd[f"{name}.alpha"]
    a = parse_state_dict(sd)
    torch.testing.assert_close(a.modules[target].delta(), base)
    assert any("no alpha" in w for w in a.warnings)
    sd[f"{name}.alpha"] = torch.tensor(0.0)
    a = parse_state_dict(sd)
    torch.testing.assert_close(a.modules[target].delta(), base)
    assert any("alpha 0" in w for w in a.warnings)


def test_kohya_sgm_block_names(tmp_path):
    """SDXL-style kohya names (SGM blocks, lora_te1_) map back to diffusers' modules.
    Only the attention/resnet blocks are renamed (samplers keep diffusers names)."""
    b = bundle()
    sd = load_file(b.write_kohya(tmp_path / "k.safetensors"))
    keep = {k: v for k, v in sd.items() if "samplers" not in k}
    sgm = {}
    for k, v in keep.items():
        name, _, suffix = k.partition(".")
        sgm[f"{to_sgm_name(name)}.{suffix}"] = v
    assert any("input_blocks_4_1" in k for k in sgm) and any("middle_block_1" in k for k in sgm)
    a_sgm = parse_state_dict(sgm)
    assert any("layers_per_block=2" in w for w in a_sgm.warnings)
    a_plain = parse_state_dict(keep)
    assert sorted(a_sgm.modules) == sorted(a_plain.modules)
    for t in a_plain.modules:
        torch.testing.assert_close(a_sgm.modules[t].delta(), a_plain.modules[t].delta())


def test_cloneofsimo_file_matches_peft(tmp_path):
    b = bundle()
    vec = torch.randn(32)
    path, ref = b.write_cloneofsimo(tmp_path / "c.safetensors", token_vec=vec)
    with pytest.raises(AdapterFormatError, match="module list"):
        load_adapter(path)
    trees = {"unet": cloneofsimo.module_tree(b.unet), "text_encoder": cloneofsimo.module_tree(b.te)}
    adapter = load_adapter(path, module_trees=trees)
    assert adapter.source_format == "cloneofsimo"
    torch.testing.assert_close(adapter.embeddings["<s1>"]["text_encoder"], vec.reshape(1, 32))
    got = compose([(adapter, 1.0)], named_weight_shapes=b.named_weight_shapes())
    assert_deltas_close(got, ref)
    # A model with a different module count is refused, with the counts.
    small = {"unet": trees["unet"][: len(trees["unet"]) // 2], "text_encoder": trees["text_encoder"]}
    with pytest.raises(AdapterFormatError, match="another architecture"):
        load_adapter(path, module_trees=small)


def test_cloneofsimo_crossattention_is_attention(tmp_path):
    """Files from before diffusers renamed `CrossAttention` to `Attention` name the old class."""
    b = bundle()
    path, ref = b.write_cloneofsimo(tmp_path / "c.safetensors")
    tensors, meta = read_safetensors(path)
    assert json.loads(meta["unet"]) == ["Attention", "GEGLU"]
    meta["unet"] = json.dumps(["CrossAttention", "GEGLU"])
    save_file(tensors, str(tmp_path / "old.safetensors"), metadata=meta)
    trees = {"unet": cloneofsimo.module_tree(b.unet), "text_encoder": cloneofsimo.module_tree(b.te)}
    adapter = load_adapter(tmp_path / "old.safetensors", module_trees=trees)
    assert_deltas_close(compose([(adapter, 1.0)], named_weight_shapes=b.named_weight_shapes()), ref)


def test_same_adapter_same_content_hash_across_formats(tmp_path):
    b = bundle()
    d = load_adapter(b.write_diffusers(tmp_path / "d"))
    from impasto.lora import export_kohya

    k = load_adapter(export_kohya(d, tmp_path / "k.safetensors"))
    assert k.content_hash == d.content_hash
    assert k.file_sha256 != d.file_sha256  # the A1111 hash is of the file, and the files differ


def test_lycoris_and_dora_refused_naming_keys():
    # Built from the LyCORIS key description (no installed library writes it).
    loha = {f"lora_unet_conv_in.hada_{w}": torch.zeros(2, 2) for w in ("w1_a", "w1_b", "w2_a", "w2_b")}
    loha["lora_unet_conv_in.alpha"] = torch.tensor(2.0)
    assert detect_format(loha) == "lycoris"
    with pytest.raises(AdapterFormatError, match=r"LoHa.*lora_unet_conv_in\.hada_w1_a"):
        parse_state_dict(loha)
    lokr = {"lora_te_text_model_encoder_layers_0_mlp_fc1.lokr_w1": torch.zeros(2, 2)}
    with pytest.raises(AdapterFormatError, match="LoKr"):
        parse_state_dict(lokr)


def test_dora_in_diffusers_file_refused(tmp_path):
    from lora_fixtures import Bundle

    b = Bundle(seed=5, unet_kw=dict(use_dora=True, rank_pattern={}, alpha_pattern={}))
    path = b.write_diffusers(tmp_path)
    with pytest.raises(AdapterFormatError, match="DoRA.*lora_magnitude_vector"):
        load_adapter(path)


def test_unknown_keys_are_listed(tmp_path):
    b = bundle()
    sd = load_file(b.write_kohya(tmp_path / "k.safetensors"))
    sd["lora_unet_conv_in.lora_mystery.weight"] = torch.zeros(1)
    sd["something_else"] = torch.zeros(1)
    path = tmp_path / "bad.safetensors"
    save_file(sd, str(path))
    with pytest.raises(AdapterFormatError) as e:
        load_adapter(path)
    assert "lora_unet_conv_in.lora_mystery.weight" in str(e.value) and "something_else" in str(e.value)
    assert str(path) in str(e.value)


def test_half_pairs_and_bare_peft_weights_refused(tmp_path):
    b = bundle()
    sd = load_file(b.write_diffusers(tmp_path / "d"))
    key = next(k for k in sd if k.endswith("lora_B.weight"))
    del sd[key]
    with pytest.raises(AdapterFormatError, match="only one of lora_A / lora_B"):
        parse_state_dict(sd)
    bare = load_file(b.write_peft_folder(tmp_path / "p") / "adapter_model.safetensors")
    with pytest.raises(AdapterFormatError, match="adapter_config.json"):
        parse_state_dict(bare)


@pytest.mark.parametrize("suffix", [".bin", ".pt", ".ckpt", ".safetensors"])
def test_pickles_refused(tmp_path, suffix):
    path = tmp_path / f"lora{suffix}"
    torch.save({"lora_unet_conv_in.lora_down.weight": torch.zeros(1)}, path)
    with pytest.raises(AdapterFormatError, match=rf"{re.escape(str(path))}: pickle checkpoints are refused"):
        load_adapter(path)


def test_folder_with_only_a_pickle_is_refused(tmp_path):
    torch.save({}, tmp_path / "adapter_model.bin")
    (tmp_path / "adapter_config.json").write_text(json.dumps({"r": 4}))
    with pytest.raises(AdapterFormatError, match="adapter_model.bin"):
        load_adapter(tmp_path)


def test_pattern_key_agrees_with_peft():
    from peft.utils.other import get_pattern_key

    patterns = ["to_k", "^down_blocks.1.attentions.0.proj_in", "ff.net.2", "attn2.to_q"]
    for path in [
        "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_k",
        "down_blocks.1.attentions.0.proj_in",
        "up_blocks.0.attentions.1.proj_in",
        "mid_block.attentions.0.transformer_blocks.0.ff.net.2",
        "mid_block.attentions.0.transformer_blocks.0.attn2.to_q",
        "mid_block.attentions.0.transformer_blocks.0.attn1.to_q",
    ]:
        theirs = get_pattern_key(patterns, path)
        ours = pattern_key(patterns, path)
        assert (ours or path) == theirs, path


# --- standalone textual-inversion files -----------------------------------------------------------


def test_embedding_files_a1111_diffusers_and_sdxl(tmp_path):
    """The three layouts of a standalone embedding: kohya-ss/A1111 `emb_params` (named after the
    file, as A1111 names it), diffusers' `{token: vectors}` (the key is the token), SDXL
    `clip_l` + `clip_g` (one row set per text encoder)."""
    vectors = torch.randn(3, 32)
    save_file({"emb_params": vectors}, str(tmp_path / "shiny-thing.safetensors"))
    a1111 = load_adapter(tmp_path / "shiny-thing.safetensors")
    assert a1111.source_format == "embedding" and not a1111.modules and a1111.components == ["text_encoder"]
    assert torch.equal(a1111.embeddings["shiny-thing"]["text_encoder"], vectors)
    assert set(load_adapter(tmp_path / "shiny-thing.safetensors", token_name="other").embeddings) == {"other"}

    save_file({"<cat-toy>": vectors[0].clone()}, str(tmp_path / "learned_embeds.safetensors"))  # one vector, 1-D
    diffusers_file = load_adapter(tmp_path / "learned_embeds.safetensors")
    assert diffusers_file.embeddings["<cat-toy>"]["text_encoder"].shape == (1, 32)

    save_file({"clip_l": torch.randn(2, 768), "clip_g": torch.randn(2, 1280)}, str(tmp_path / "xl.safetensors"))
    xl = load_adapter(tmp_path / "xl.safetensors")
    assert {c: tuple(v.shape) for c, v in xl.embeddings["xl"].items()} == {"text_encoder": (2, 768), "text_encoder_2": (2, 1280)}


def test_embedding_files_that_are_not_one_token_are_refused(tmp_path):
    with pytest.raises(AdapterFormatError, match="only clip_l"):
        parse_state_dict({"clip_l": torch.randn(2, 768)}, token_name="t")
    with pytest.raises(AdapterFormatError, match="different numbers of vectors"):
        parse_state_dict({"clip_l": torch.randn(2, 768), "clip_g": torch.randn(3, 1280)}, token_name="t")
    with pytest.raises(AdapterFormatError, match="pass token_name"):
        parse_state_dict({"emb_params": torch.randn(2, 768)})
    with pytest.raises(AdapterFormatError, match="not a LoRA or embedding format"):
        detect_format({"<a>": torch.randn(768), "<b>": torch.randn(768)})  # A1111 and diffusers read one per file


def test_embeddings_alone_export_as_a1111_embedding_files_and_round_trip(tmp_path):
    from impasto.lora import CanonicalAdapter, export_kohya

    one = CanonicalAdapter(modules={}, embeddings={"<s1>": {"text_encoder": torch.randn(2, 32)}})
    path = export_kohya(one, tmp_path / "<s1>.safetensors")
    assert set(load_file(str(path))) == {"emb_params"}  # what kohya-ss writes and A1111 reads
    assert load_adapter(path).content_hash == one.content_hash  # named after the file, as A1111 does
    xl = CanonicalAdapter(modules={}, embeddings={"t": {"text_encoder": torch.randn(1, 8), "text_encoder_2": torch.randn(1, 16)}})
    assert set(load_file(str(export_kohya(xl, tmp_path / "t.safetensors")))) == {"clip_l", "clip_g"}
    assert load_adapter(tmp_path / "t.safetensors").content_hash == xl.content_hash
    two = CanonicalAdapter(modules={}, embeddings={"<a>": {"text_encoder": torch.randn(1, 32)}, "<b>": {"text_encoder": torch.randn(3, 32)}})
    path = export_kohya(two, tmp_path / "two.safetensors")
    assert all(k.startswith("bundle_emb.") for k in load_file(str(path)))  # A1111's bundle, without LoRA keys
    assert detect_format(load_file(str(path))) == "kohya" and load_adapter(path).content_hash == two.content_hash
