"""Image comparisons the integration tests share: decode an image's bytes, and PSNR in dB."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image as PILImage


def pixels(data: bytes) -> np.ndarray:
    """Encoded image bytes -> HxWx3 uint8."""
    return np.asarray(PILImage.open(io.BytesIO(data)).convert("RGB"))


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR of two uint8 images in dB; inf when they are equal."""
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def diffusers_reference(pipe, prompt: str, negative_prompt: str, *, sampler: str, seed: int, num_steps: int,
                        guidance_scale: float, callback=None) -> np.ndarray:
    """diffusers' own StableDiffusionPipeline image (uint8) for the settings a test sends the
    server: the A1111 sampler name mapped to the same noise scheduler, seeded alike."""
    import torch

    from impasto.core.samplers import SAMPLERS, make_noise_scheduler

    base_config = getattr(pipe, "base_scheduler_config", None) or dict(pipe.scheduler.config)
    pipe.scheduler = make_noise_scheduler(SAMPLERS[sampler], base_config, seed)
    out = pipe(
        prompt,
        negative_prompt=negative_prompt,
        num_inference_steps=num_steps,
        guidance_scale=guidance_scale,
        generator=torch.Generator("cpu").manual_seed(seed),
        output_type="np",
        callback_on_step_end=callback,
    ).images[0]
    return (out * 255).round().astype("uint8")
