"""A served model's layout for adapter parsing: module trees built from configs on `meta`."""

from __future__ import annotations

from diffusers import UNet2DConditionModel
from transformers import CLIPTextModel

from impasto.core.model_layout import ModelLayouts
from impasto.lora.formats.cloneofsimo import module_tree
from impasto.models import default_model_path


def test_trees_from_configs_equal_the_loaded_modules_and_are_built_once():
    folder = default_model_path()
    layouts = ModelLayouts(lambda name: folder if name == "default" else None)
    layout = layouts("default")
    assert layouts("default") is layout and layouts("gone") is None
    assert layout.unet_config.layers_per_block == UNet2DConditionModel.load_config(folder / "unet")["layers_per_block"]
    trees = layout.module_trees
    assert list(trees) == ["unet", "text_encoder"] and "text_encoder_2" not in trees
    assert list(trees["unet"]) == module_tree(UNet2DConditionModel.from_pretrained(folder / "unet"))
    assert list(trees["text_encoder"]) == module_tree(CLIPTextModel.from_pretrained(folder / "text_encoder"))
    assert trees["unet"] is trees["unet"], "built once per model"
    assert all(isinstance(x, (str, bool)) for entry in trees["unet"] for x in entry), "names only, no tensors"
