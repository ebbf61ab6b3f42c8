"""Portable seeds: the server's torch backend makes diffusers' image for the same settings.

The reference is what a diffusers user writes:
    pipe(prompt, negative_prompt=..., num_inference_steps=..., guidance_scale=...,
         generator=torch.Generator("cpu").manual_seed(seed))
with the pipeline's scheduler swapped for the sampler's diffusers equivalent.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image as PILImage

from image_checks import diffusers_reference, psnr
from impasto.models import default_model_path
from impasto_client import Image

PROMPT = "a red circle on a white background"
NEGATIVE = "a blue square"




@pytest.fixture(scope="module")
def pipe():
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(default_model_path(), safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    pipe.base_scheduler_config = dict(pipe.scheduler.config)  # each test swaps the scheduler
    return pipe


def diffusers_image(pipe, sampler: str, seed: int, steps: int, guidance: float) -> np.ndarray:
    return diffusers_reference(pipe, PROMPT, NEGATIVE, sampler=sampler, seed=seed, num_steps=steps, guidance_scale=guidance)


@pytest.mark.parametrize(
    "sampler", ["euler", "euler_a", "heun", "lms", "ddim", "pndm", "dpmpp_2m_karras", "dpmpp_sde_karras", "unipc", "lcm"]
)
def test_server_image_matches_diffusers(client, pipe, sampler):
    seed, steps, guidance = 1234, 8, 7.5
    image = next(
        e
        for e in client.generate(PROMPT, negative_prompt=NEGATIVE, sampler=sampler, seed=seed, num_steps=steps, guidance_scale=guidance)
        if isinstance(e, Image)
    )
    ours = np.asarray(PILImage.open(io.BytesIO(image.data)).convert("RGB"))
    reference = diffusers_image(pipe, sampler, seed, steps, guidance)
    assert ours.shape == reference.shape
    assert psnr(ours, reference) >= 40


def test_guidance_one_skips_cfg_like_diffusers(client, pipe):
    image = next(e for e in client.generate(PROMPT, sampler="euler", seed=9, num_steps=5, guidance_scale=1.0) if isinstance(e, Image))
    ours = np.asarray(PILImage.open(io.BytesIO(image.data)).convert("RGB"))
    assert psnr(ours, diffusers_image(pipe, "euler", 9, 5, 1.0)) >= 40
