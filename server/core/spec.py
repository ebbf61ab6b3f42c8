"""Plain dataclasses that cross between the rpc layer and the core: a request and its events."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum


class ImageFormat(str, Enum):
    PNG = "png"
    JPEG = "jpeg"
    WEBP = "webp"


class Priority(int, Enum):
    # Lower runs first. Training jobs (their own issue) sit below batch work.
    INTERACTIVE = 0
    BATCH = 1
    TRAINING = 2  # a training job's own requests (DreamBooth class images)


@dataclass(frozen=True)
class AdapterWeight:
    adapter: str  # id (or an id prefix) or name
    weight: float = 1.0
    weight_schedule: str = ""  # "w@f,w@f,..." (adapter_syntax.py); overrides weight when set


@dataclass(frozen=True)
class GenerationSpec:
    """What a client asked for. None means "the model's default"; the core resolves it."""

    prompt: str
    negative_prompt: str = ""
    model: str = ""
    width: int = 0
    height: int = 0
    num_steps: int | None = None
    guidance_scale: float | None = None
    sampler: str = ""
    seed: int | None = None
    num_images: int = 1
    image_format: ImageFormat = ImageFormat.PNG
    preview_every: int = 0
    adapters: tuple[AdapterWeight, ...] = ()
    priority: Priority = Priority.INTERACTIVE


@dataclass(frozen=True)
class ResolvedSpec:
    """A spec with every default filled in and validated against the model and the limits."""

    prompt: str
    negative_prompt: str
    model_name: str
    width: int
    height: int
    num_steps: int
    guidance_scale: float
    sampler: str
    seed: int
    num_images: int
    image_format: ImageFormat
    preview_every: int
    priority: Priority

    @property
    def uses_cfg(self) -> bool:
        # diffusers' rule: guidance_scale > 1 runs the unconditional half.
        return self.guidance_scale > 1.0


# Events, in the order a stream sees them: Queued? Started Progress* Image{n} Done.


@dataclass(frozen=True)
class Queued:
    position: int


@dataclass(frozen=True)
class Started:
    spec: ResolvedSpec
    num_denoiser_steps: int


@dataclass(frozen=True)
class Progress:
    step: int
    num_steps: int
    eta_seconds: float
    preview: bytes = b""
    preview_mime_type: str = ""


@dataclass(frozen=True)
class ImageReady:
    index: int
    data: bytes
    mime_type: str
    seed: int
    infotext: str


@dataclass(frozen=True)
class Done:
    num_images: int
    elapsed_seconds: float


@dataclass(frozen=True)
class Failed:
    """Ends a stream with an error raised inside the step loop."""

    error: BaseException = field(compare=False)


Event = Queued | Started | Progress | ImageReady | Done | Failed
