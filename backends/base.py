"""The engine contract every backend implements, and the names of engine inputs/outputs.

An engine is one model component on one backend. Its whole surface is
`run(inputs) -> outputs`, `refit(named_weights)`, `restore()`, `info()` and `accepts(...)`,
so the step loop drives torch, ONNX Runtime, OpenVINO and TensorRT engines the same way.

Inputs and outputs are named CPU torch tensors. Compiled backends convert at their edge
(zero-copy for numpy); keeping torch here lets diffusers' noise schedulers consume outputs
without another conversion.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum

import torch


class Component(str, Enum):
    TEXT_ENCODER = "text_encoder"
    UNET = "unet"
    VAE_DECODER = "vae_decoder"
    VAE_ENCODER = "vae_encoder"


# Input/output names per component. The compiler exports with exactly these names.
TEXT_ENCODER_INPUTS = ("input_ids",)
# Optional text-encoder inputs that only the torch engine takes (compiled engines are exported
# with input_ids alone): `token_vectors` (batch, seq, hidden) replace the token-table rows where
# `token_vector_mask` (batch, seq) is true. Textual-inversion vectors enter the encoder this way;
# the ids at those positions are placeholders.
TEXT_ENCODER_VECTOR_INPUTS = ("token_vectors", "token_vector_mask")
TEXT_ENCODER_OUTPUTS = ("last_hidden_state",)
UNET_INPUTS = ("sample", "timestep", "encoder_hidden_states")
UNET_OUTPUTS = ("noise_pred",)
VAE_DECODER_INPUTS = ("latent",)
VAE_DECODER_OUTPUTS = ("image",)
VAE_ENCODER_INPUTS = ("image",)
VAE_ENCODER_OUTPUTS = ("latent_mean",)


@dataclass(frozen=True)
class ShapeProfile:
    """The shapes an engine accepts. None means any (dynamic, as in eager torch).

    Sizes are in pixels of the generated image; a static engine has min == max.
    """

    min_batch: int = 1
    max_batch: int | None = None
    sizes: tuple[tuple[int, int], ...] | None = None  # allowed (width, height); None: any

    def accepts(self, batch: int, width: int, height: int) -> bool:
        if batch < self.min_batch or (self.max_batch is not None and batch > self.max_batch):
            return False
        return self.sizes is None or (width, height) in self.sizes

    def describe(self) -> str:
        batch = f"{self.min_batch}-{self.max_batch if self.max_batch is not None else 'any'}"
        sizes = "any" if self.sizes is None else ",".join(f"{w}x{h}" for w, h in self.sizes)
        return f"batch {batch}, sizes {sizes}"


@dataclass(frozen=True)
class EngineInfo:
    component: Component
    backend: str
    precision: str
    device: str
    profile: ShapeProfile = field(default_factory=ShapeProfile)


class Engine(ABC):
    """One runnable model component. Not thread-safe: one step loop drives it."""

    @abstractmethod
    def run(self, inputs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Run once on named inputs; batch and spatial sizes come from the inputs."""

    @abstractmethod
    def refit(self, named_weights: Mapping[str, torch.Tensor]) -> None:
        """Replace the named weights in place (names are torch parameter names).

        Weights not named keep their current values. Refitting never accumulates: the
        caller passes full weights (base + delta), so A, then B, then A gives A exactly.
        """

    @abstractmethod
    def restore(self) -> None:
        """Return every refitted weight to its base value, bit for bit."""

    @abstractmethod
    def info(self) -> EngineInfo:
        """What this engine is: backend, precision, device, shape profile."""

    def accepts(self, batch: int, width: int, height: int) -> bool:
        return self.info().profile.accepts(batch, width, height)


@dataclass
class ModelEngines:
    """The engines of one model on one backend."""

    text_encoder: Engine
    unet: Engine
    vae_decoder: Engine
    vae_encoder: Engine | None = None

    def all(self) -> list[Engine]:
        engines = [self.text_encoder, self.unet, self.vae_decoder]
        return engines + ([self.vae_encoder] if self.vae_encoder is not None else [])


class BackendUnavailable(RuntimeError):
    """A backend cannot run here (package missing, no device); the message says why."""
