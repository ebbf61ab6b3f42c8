"""The default model's recipe (models/train_default.py) runs from end to end and writes a folder
diffusers loads. A smoke run of a few steps: what the recipe's weights are worth is measured by
benchmarks/default_model_quality.py, not here."""

from __future__ import annotations

import torch

from impasto.models import train_default


def test_a_few_steps_of_the_recipe_write_a_pipeline_folder(tmp_path, monkeypatch):
    from impasto.models.shapes import HELD_OUT_COLOUR, HELD_OUT_SHAPE

    drawn = []  # the shapes and colours of each set of scenes the recipe renders
    sample = train_default.sample_scenes

    def recording(*args, **kwargs):
        scenes = sample(*args, **kwargs)
        drawn.append(({s.shape for s in scenes}, {s.colour for s in scenes}))
        return scenes

    monkeypatch.setattr(train_default, "sample_scenes", recording)
    out = tmp_path / "model"
    train_default.main([
        "--out", str(out), "--num_images", "48", "--vae_steps", "2", "--vae_full_image_steps", "1", "--vae_batch", "4",
        "--unet_steps", "2", "--unet_batch", "4", "--warmup_steps", "1", "--log_every", "1",
        "--vae_sees_held_out", "1",  # the VAE on every colour and shape; the UNet still on the seen ones
    ])  # fmt: skip
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(out, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    image = pipe("a red circle", num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="np").images[0]
    assert image.shape == (64, 64, 3)
    assert 0 < pipe.vae.config.scaling_factor < 10
    # The UNet's scenes (drawn first) show neither held-out name; the VAE's, with the option, both.
    (unet_shapes, unet_colours), (vae_shapes, vae_colours) = drawn
    assert HELD_OUT_SHAPE not in unet_shapes and HELD_OUT_COLOUR not in unet_colours
    assert HELD_OUT_SHAPE in vae_shapes and HELD_OUT_COLOUR in vae_colours
