"""Turn a client's GenerationSpec into a ResolvedSpec: defaults filled in, every field checked.

Every error names the field, so the rpc layer can answer INVALID_ARGUMENT with a message a
client developer can act on. Nothing is silently corrected (a width of 500 is refused, not
rounded to 504).
"""

from __future__ import annotations

import math
import secrets

from impasto.config import Limits

from .errors import InvalidArgument
from .model_registry import ModelEntry
from .samplers import get_sampler
from .spec import GenerationSpec, ResolvedSpec

MAX_SEED = 2**64 - 1
SIZE_MULTIPLE = 8


def resolve_spec(spec: GenerationSpec, model: ModelEntry, limits: Limits) -> ResolvedSpec:
    if len(spec.prompt) > limits.max_prompt_chars:
        raise InvalidArgument("prompt", f"{len(spec.prompt)} characters; the limit is {limits.max_prompt_chars}")
    if len(spec.negative_prompt) > limits.max_prompt_chars:
        raise InvalidArgument("negative_prompt", f"{len(spec.negative_prompt)} characters; the limit is {limits.max_prompt_chars}")

    width, height = spec.width, spec.height
    if width == 0 and height == 0:
        width, height = model.default_width, model.default_height
    for name, value in (("width", width), ("height", height)):
        if value == 0:
            raise InvalidArgument(name, "must be set when the other side is (0 for both means the model's default)")
        if value % SIZE_MULTIPLE:
            raise InvalidArgument(name, f"{value} is not a multiple of {SIZE_MULTIPLE}")
    if width * height > limits.max_pixels:
        raise InvalidArgument("width", f"{width}x{height} is {width * height} pixels; the limit is {limits.max_pixels}")

    num_steps = model.defaults.num_steps if spec.num_steps is None else spec.num_steps
    if num_steps < 1:
        raise InvalidArgument("num_steps", f"must be at least 1, got {num_steps}")
    if num_steps > limits.max_steps:
        raise InvalidArgument("num_steps", f"{num_steps} is over the limit of {limits.max_steps}")

    guidance = model.defaults.guidance_scale if spec.guidance_scale is None else spec.guidance_scale
    if math.isnan(guidance) or math.isinf(guidance):
        raise InvalidArgument("guidance_scale", f"must be a finite number, got {guidance}")
    if guidance < 0:
        raise InvalidArgument("guidance_scale", f"must not be negative, got {guidance}")

    sampler = get_sampler(spec.sampler or model.defaults.sampler).name

    num_images = spec.num_images or 1
    if num_images < 0 or num_images > limits.max_images_per_request:
        raise InvalidArgument("num_images", f"{num_images} is over the limit of {limits.max_images_per_request}")

    seed = secrets.randbits(32) if spec.seed is None else spec.seed
    if not 0 <= seed or seed + num_images - 1 > MAX_SEED:
        raise InvalidArgument("seed", f"seed + num_images - 1 must fit in 64 bits, got seed {seed}")

    if spec.preview_every < 0:
        raise InvalidArgument("preview_every", f"must not be negative, got {spec.preview_every}")
    for i, ref in enumerate(spec.adapters):
        # Which adapters exist is the adapter registry's business (image_engine); here, the form.
        if not ref.adapter:
            raise InvalidArgument(f"adapters[{i}].adapter", "must name an adapter (id or name)")
        if not math.isfinite(ref.weight):
            raise InvalidArgument(f"adapters[{i}].weight", f"must be a finite number, got {ref.weight}")

    return ResolvedSpec(
        prompt=spec.prompt,
        negative_prompt=spec.negative_prompt,
        model_name=model.name,
        width=width,
        height=height,
        num_steps=num_steps,
        guidance_scale=float(guidance),
        sampler=sampler,
        seed=seed,
        num_images=num_images,
        image_format=spec.image_format,
        preview_every=spec.preview_every,
        priority=spec.priority,
    )
