"""Per-request state the step loop owns: latents, noise schedulers and generators per image.

Image k of a request is its own sequence with seed + k (A1111's convention): its own
`torch.Generator`, its own noise-scheduler instance, its own latents. That makes image k
identical to diffusers' pipeline called with `generator=torch.Generator("cpu").manual_seed(seed + k)`,
and lets the images of one request run in any batch.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from .adapter_weights import NO_ADAPTERS, RequestAdapters
from .model_registry import LoadedModel
from .samplers import SamplerDef, make_noise_scheduler
from .spec import Event, ResolvedSpec


@dataclass
class Sequence:
    seed: int
    generator: torch.Generator
    noise_scheduler: object
    latents: torch.Tensor
    denoised: torch.Tensor | None = None  # the sampler's current estimate of the clean latents
    step_kwargs: dict = field(default_factory=dict)


@dataclass
class RequestState:
    request_id: str
    spec: ResolvedSpec
    sampler: SamplerDef
    model: LoadedModel
    chunks: list[tuple[int, ...]]  # prompt token chunks
    negative_chunks: list[tuple[int, ...]]
    emit: Callable[[Event], None]
    adapters: RequestAdapters = NO_ADAPTERS
    arrival: float = field(default_factory=time.monotonic)
    cond: torch.Tensor | None = None  # (1, 77*k, dim)
    uncond: torch.Tensor | None = None
    sequences: list[Sequence] = field(default_factory=list)
    timesteps: list = field(default_factory=list)
    step_index: int = 0
    started_at: float = 0.0
    last_progress_at: float = 0.0
    ema_step_interval: float = 0.0

    @property
    def batch_key(self) -> tuple:
        # Everything that must be equal for requests to share one UNet call.
        latent_h = self.spec.height // self.model.vae_scale_factor
        latent_w = self.spec.width // self.model.vae_scale_factor
        # The adapter set is part of it: the UNet's weights are refitted per set, never mixed.
        return (self.model.entry.name, latent_h, latent_w, len(self.chunks), self.adapters.batch_key(self.request_id))

    @property
    def step_fraction(self) -> float:
        """Fraction of the steps done before the next one (a weight schedule's clock)."""
        return self.step_index / max(len(self.timesteps), 1)

    @property
    def num_denoiser_steps(self) -> int:
        """UNet evaluations the sampler needs (second-order samplers need more than num_steps)."""
        probe = make_noise_scheduler(self.sampler, self.model.scheduler_config, self.spec.seed)
        probe.set_timesteps(self.spec.num_steps)
        return len(probe.timesteps)

    def prepare(self) -> None:
        """Initial latents and noise schedulers, exactly as diffusers' txt2img pipeline makes them."""
        shape = (
            1,
            self.model.latent_channels,
            self.spec.height // self.model.vae_scale_factor,
            self.spec.width // self.model.vae_scale_factor,
        )
        for k in range(self.spec.num_images):
            seed = self.spec.seed + k
            noise_scheduler = make_noise_scheduler(self.sampler, self.model.scheduler_config, seed)
            noise_scheduler.set_timesteps(self.spec.num_steps)
            generator = torch.Generator("cpu").manual_seed(seed)
            latents = torch.randn(shape, generator=generator, dtype=torch.float32) * noise_scheduler.init_noise_sigma
            accepted = inspect.signature(noise_scheduler.step).parameters
            kwargs = {"generator": generator} if "generator" in accepted else {}
            if "eta" in accepted:
                kwargs["eta"] = 0.0
            self.sequences.append(Sequence(seed, generator, noise_scheduler, latents, step_kwargs=kwargs))
        self.timesteps = list(self.sequences[0].noise_scheduler.timesteps)
        self.started_at = time.monotonic()

    @property
    def finished(self) -> bool:
        return self.step_index >= len(self.timesteps)
