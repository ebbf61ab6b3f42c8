"""Run a model's engines end to end, the way the step loop does, to compare backends.

A plain text-to-image loop (text encoder, Euler steps with classifier-free guidance, VAE
decode) over any `ModelEngines`, and PSNR between two images. The compiler's tests and the
benchmark use it to check an engine folder against the torch engines on the same inputs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from impasto.backends.base import ModelEngines


@dataclass(frozen=True)
class ImageRequest:
    input_ids: torch.Tensor  # (1, 77) int64, the prompt
    uncond_ids: torch.Tensor  # (1, 77) int64, the empty prompt
    width: int
    height: int
    num_steps: int
    guidance_scale: float = 7.5
    seed: int = 0
    vae_scale: int = 8  # image pixels per latent pixel


def noise_scheduler(model_dir: Path):
    from diffusers import EulerDiscreteScheduler

    # a fresh instance per image: diffusers schedulers are stateful
    return EulerDiscreteScheduler.from_pretrained(Path(model_dir) / "scheduler")


def initial_latents(request: ImageRequest, channels: int = 4) -> torch.Tensor:
    generator = torch.Generator().manual_seed(request.seed)
    return torch.randn((1, channels, request.height // request.vae_scale, request.width // request.vae_scale), generator=generator)


def encode_prompts(engines: ModelEngines, request: ImageRequest) -> torch.Tensor:
    ids = torch.cat([request.uncond_ids, request.input_ids])
    return engines.text_encoder.run({"input_ids": ids})["last_hidden_state"]


def unet_step(engines: ModelEngines, latents, t, embeddings, guidance_scale, scheduler) -> torch.Tensor:
    sample = scheduler.scale_model_input(torch.cat([latents, latents]), t)
    timestep = t.to(torch.float32).expand(2).contiguous()
    noise = engines.unet.run({"sample": sample, "timestep": timestep, "encoder_hidden_states": embeddings})["noise_pred"]
    uncond, cond = noise.chunk(2)
    return uncond + guidance_scale * (cond - uncond)


def generate(engines: ModelEngines, request: ImageRequest, model_dir: Path, vae_scaling_factor: float) -> torch.Tensor:
    """One image, (1, 3, H, W) in [-1, 1]."""
    scheduler = noise_scheduler(model_dir)
    scheduler.set_timesteps(request.num_steps)
    embeddings = encode_prompts(engines, request)
    latents = initial_latents(request) * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        guided = unet_step(engines, latents, t, embeddings, request.guidance_scale, scheduler)
        latents = scheduler.step(guided, t, latents).prev_sample
    image = engines.vae_decoder.run({"latent": latents / vae_scaling_factor})["image"]
    return image.clamp(-1, 1)


def psnr(image: torch.Tensor, reference: torch.Tensor) -> float:
    """PSNR in dB of two images in [-1, 1] (peak 2); inf when equal."""
    mse = torch.mean((image.double() - reference.double()) ** 2).item()
    return math.inf if mse == 0 else 10 * math.log10(4.0 / mse)
