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
