"""Shape profiles from the command line: `WxH:min_batch-max_batch` (e.g. `512x512:1-4`, `256x256:2`).

Sizes are image pixels (multiples of 8, SD's VAE scale); the batch is the engine's input batch
(with classifier-free guidance the UNet sees twice the number of images).
"""

from __future__ import annotations

import re

from impasto.backends.manifest import Profile

_PATTERN = re.compile(r"^(\d+)x(\d+)(?::(\d+)(?:-(\d+))?)?$")


def parse_profile(text: str) -> Profile:
    match = _PATTERN.match(text.strip())
    if not match:
        raise ValueError(f"profile {text!r}: expected WxH:min_batch-max_batch, e.g. 512x512:1-4")
    width, height = int(match[1]), int(match[2])
    min_batch = int(match[3] or 1)
    max_batch = int(match[4] or match[3] or 1)
    if width % 8 or height % 8 or width <= 0 or height <= 0:
        raise ValueError(f"profile {text!r}: width and height must be positive multiples of 8")
    if not 1 <= min_batch <= max_batch:
        raise ValueError(f"profile {text!r}: need 1 <= min_batch <= max_batch")
    return Profile(width, height, min_batch, max_batch)


def default_profiles(unet_sample_size: int, vae_scale: int) -> list[Profile]:
    """The model's native size, one image with guidance (UNet batch 2) or without (1)."""
    size = unet_sample_size * vae_scale
    return [Profile(size, size, 1, 2)]
