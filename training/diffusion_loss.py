"""The denoising objective of Stable Diffusion 1.x, shared by every trainer.

A trainer draws timesteps and noise, calls `noisy_latents_and_target`, runs its UNet, and
hands the prediction to `diffusion_loss`. The noise schedule is a diffusers `DDPMScheduler`
built from the model's own scheduler config, so training and sampling agree on the betas.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from diffusers.training_utils import compute_snr


def training_noise_scheduler(scheduler_config: dict) -> DDPMScheduler:
    """The DDPM (training) view of a model's noise schedule, whatever sampler it ships with."""
    return DDPMScheduler.from_config(scheduler_config)


def sample_timesteps(noise_scheduler: DDPMScheduler, batch_size: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Uniform integer timesteps in [0, num_train_timesteps), as SD was trained."""
    n = noise_scheduler.config.num_train_timesteps
    return torch.randint(0, n, (batch_size,), generator=generator, dtype=torch.long)


def noisy_latents_and_target(
    noise_scheduler: DDPMScheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """x_t = sqrt(a)·x_0 + sqrt(1-a)·eps, and what the UNet must predict from it."""
    noisy = noise_scheduler.add_noise(latents, noise, timesteps)
    kind = noise_scheduler.config.prediction_type
    if kind == "epsilon":
        target = noise
    elif kind == "v_prediction":
        target = noise_scheduler.get_velocity(latents, noise, timesteps)
    else:
        raise ValueError(f"unsupported prediction_type {kind!r} (epsilon or v_prediction)")
    return noisy, target


def diffusion_loss(
    noise_scheduler: DDPMScheduler,
    model_pred: torch.Tensor,
    target: torch.Tensor,
    timesteps: torch.Tensor,
    snr_gamma: float | None = 5.0,
) -> torch.Tensor:
    """MSE between prediction and target, optionally Min-SNR-γ weighted.

    Min-SNR (Hang et al. 2023) down-weights the low-noise timesteps whose eps targets are
    easy but whose gradients dominate; it roughly halves the steps a small model needs.
    None gives SD's plain MSE.
    """
    pred, target = model_pred.float(), target.float()
    if snr_gamma is None:
        return F.mse_loss(pred, target)
    snr = compute_snr(noise_scheduler, timesteps)
    weight = torch.clamp(snr, max=snr_gamma) / snr
    if noise_scheduler.config.prediction_type == "v_prediction":
        weight = torch.clamp(snr, max=snr_gamma) / (snr + 1)
    per_sample = F.mse_loss(pred, target, reduction="none").mean(dim=(1, 2, 3))
    return (per_sample * weight).mean()
