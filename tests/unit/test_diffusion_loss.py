"""The shared denoising objective: targets per prediction type and the Min-SNR weighting."""

from __future__ import annotations

import pytest
import torch

from impasto.models.architecture import NOISE_SCHEDULE
from impasto.training.diffusion_loss import (
    diffusion_loss,
    noisy_latents_and_target,
    sample_timesteps,
    training_noise_scheduler,
)


def test_epsilon_target_is_the_noise_and_noisy_latents_mix_both():
    sched = training_noise_scheduler(NOISE_SCHEDULE)
    g = torch.Generator().manual_seed(0)
    latents, noise = torch.randn(4, 4, 8, 8, generator=g), torch.randn(4, 4, 8, 8, generator=g)
    t = torch.tensor([0, 10, 500, 999])
    noisy, target = noisy_latents_and_target(sched, latents, noise, t)
    assert torch.equal(target, noise)
    a = sched.alphas_cumprod[t].view(-1, 1, 1, 1)
    assert torch.allclose(noisy, a.sqrt() * latents + (1 - a).sqrt() * noise, atol=1e-5)


def test_v_prediction_target():
    sched = training_noise_scheduler({**NOISE_SCHEDULE, "prediction_type": "v_prediction"})
    latents, noise, t = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8), torch.tensor([100, 900])
    _, target = noisy_latents_and_target(sched, latents, noise, t)
    assert torch.allclose(target, sched.get_velocity(latents, noise, t))


def test_plain_loss_is_mse_and_min_snr_downweights_low_noise():
    sched = training_noise_scheduler(NOISE_SCHEDULE)
    pred, target = torch.ones(2, 4, 8, 8), torch.zeros(2, 4, 8, 8)
    assert diffusion_loss(sched, pred, target, torch.tensor([1, 999]), snr_gamma=None).item() == pytest.approx(1.0)
    low = diffusion_loss(sched, pred[:1], target[:1], torch.tensor([1]), snr_gamma=5.0)
    high = diffusion_loss(sched, pred[:1], target[:1], torch.tensor([999]), snr_gamma=5.0)
    assert low.item() < 0.1 and high.item() == pytest.approx(1.0)


def test_timesteps_cover_the_schedule_and_are_seeded():
    sched = training_noise_scheduler(NOISE_SCHEDULE)
    a = sample_timesteps(sched, 4096, torch.Generator().manual_seed(1))
    b = sample_timesteps(sched, 4096, torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and a.min() >= 0 and a.max() <= 999 and a.max() > 990
