"""Exports load back: into diffusers' pipeline (`load_lora_weights`), into peft (`PeftModel`),
and into our own parsers, with the same deltas."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from lora_fixtures import assert_deltas_close, bundle, peft_deltas, single_torch_thread  # noqa: F401 (fixture)
from safetensors import safe_open

from impasto.lora import AdapterFormatError, compose, export_diffusers, export_kohya, export_peft_folder, load_adapter
from impasto.lora.formats.cloneofsimo import module_tree

REPO = Path(__file__).resolve().parents[2]


def tiny_pipeline(b):
    """A real StableDiffusionPipeline around the fixture's UNet and text encoder."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline
    from transformers import CLIPTokenizer

    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=[32, 64], in_channels=3, out_channels=3, latent_channels=4,
                        down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2)
    tok = CLIPTokenizer(str(REPO / "models/clip_tokenizer/vocab.json"), str(REPO / "models/clip_tokenizer/merges.txt"))
    return StableDiffusionPipeline(
        unet=copy.deepcopy(b.unet), text_encoder=copy.deepcopy(b.te), vae=vae, tokenizer=tok,
        scheduler=DDIMScheduler(), safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


def pipeline_deltas(pipe):
    out = {f"unet.{k}": v for k, v in peft_deltas(pipe.unet).items()}
    out.update({f"text_encoder.{k}": v for k, v in peft_deltas(pipe.text_encoder).items()})
    return out


@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    b = bundle()
    return load_adapter(b.write_diffusers(tmp_path_factory.mktemp("src")))


def test_diffusers_export_loads_with_load_lora_weights(adapter, tmp_path):
    b = bundle()
    path = export_diffusers(adapter, tmp_path / "pytorch_lora_weights.safetensors")
    pipe = tiny_pipeline(b)
    pipe.load_lora_weights(str(tmp_path), weight_name=path.name)
    assert_deltas_close(pipeline_deltas(pipe), b.deltas)
    assert load_adapter(path).content_hash == adapter.content_hash


def test_kohya_export_loads_with_load_lora_weights(adapter, tmp_path):
    """diffusers reads our kohya file's alphas (alpha != rank here) and gets the same deltas."""
    b = bundle()
    path = export_kohya(adapter, tmp_path / "k.safetensors")
    with safe_open(str(path), "pt") as f:
        keys = list(f.keys())
    assert any(k.startswith("lora_te_text_model_encoder_layers_0_self_attn_q_proj.") for k in keys)  # kohya SD1 spelling
    assert not any(k.startswith("lora_te1_") for k in keys)
    pipe = tiny_pipeline(b)
    pipe.load_lora_weights(str(tmp_path), weight_name=path.name)
    assert_deltas_close(pipeline_deltas(pipe), b.deltas)
    again = load_adapter(path)
    assert again.content_hash == adapter.content_hash


def test_peft_folder_export_loads_with_peft(adapter, tmp_path):
    from peft import PeftModel

    b = bundle()
    folder = export_peft_folder(adapter, tmp_path / "unet_adapter", component="unet")
    merged = PeftModel.from_pretrained(copy.deepcopy(b.unet), str(folder)).merge_and_unload().state_dict()
    want = {f"unet.{k}": v for k, v in b.unet.state_dict().items()}
    deltas = compose([(adapter, 1.0)], named_weight_shapes=b.named_weight_shapes())
    assert sorted(f"unet.{k}" for k in merged) == sorted(want)
    for k, v in merged.items():
        name = f"unet.{k}"
        expected = want[name] + deltas[name].reshape(v.shape) if name in deltas else want[name]
        torch.testing.assert_close(v, expected, atol=1e-5, rtol=1e-5, msg=k)
    # text encoder: written under the installed model's own module names
    te_folder = export_peft_folder(adapter, tmp_path / "te_adapter", component="text_encoder",
                                   module_names=[n for n, _ in b.te.named_modules()])
    te = PeftModel.from_pretrained(copy.deepcopy(b.te), str(te_folder))
    assert_deltas_close({f"text_encoder.{k}": v for k, v in peft_deltas(te).items()},
                        {k: v for k, v in b.deltas.items() if k.startswith("text_encoder.")})
    cfg = json.loads((te_folder / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 2 and cfg["lora_alpha"] == 6
    # exporting over an existing folder needs overwrite
    with pytest.raises(FileExistsError):
        export_peft_folder(adapter, te_folder, component="text_encoder")


def test_embeddings_go_to_kohya_bundle_and_are_refused_elsewhere(tmp_path):
    b = bundle()
    path, _ = b.write_cloneofsimo(tmp_path / "c.safetensors", token_vec=torch.randn(32))
    a = load_adapter(path, module_trees={"unet": module_tree(b.unet), "text_encoder": module_tree(b.te)})
    with pytest.raises(AdapterFormatError, match="<s1>"):
        export_diffusers(a, tmp_path / "d.safetensors")
    k = load_adapter(export_kohya(a, tmp_path / "k.safetensors"))
    torch.testing.assert_close(k.embeddings["<s1>"]["text_encoder"], a.embeddings["<s1>"]["text_encoder"])
    assert k.content_hash == a.content_hash
