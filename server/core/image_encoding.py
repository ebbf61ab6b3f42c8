"""Encode decoded images to PNG, JPEG or WEBP with the infotext embedded where A1111 looks.

- PNG: a tEXt chunk named "parameters".
- JPEG / WEBP: EXIF UserComment, encoded as the EXIF spec's UNICODE form (an 8-byte
  "UNICODE\\0" header, then UTF-16 big-endian text), which is what A1111 writes via piexif.

Encoding is CPU work of a few ms to tens of ms per image, so callers run it off the event
loop and off the step loop (a thread pool).
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, PngImagePlugin

from .spec import ImageFormat

MIME_TYPES = {ImageFormat.PNG: "image/png", ImageFormat.JPEG: "image/jpeg", ImageFormat.WEBP: "image/webp"}
EXIF_IFD_POINTER = 0x8769
EXIF_USER_COMMENT = 0x9286
UNICODE_HEADER = b"UNICODE\0"


def encode_image(pixels: np.ndarray, fmt: ImageFormat, infotext: str = "", quality: int = 95) -> bytes:
    """pixels: HxWx3 uint8."""
    image = Image.fromarray(pixels, mode="RGB")
    out = io.BytesIO()
    if fmt == ImageFormat.PNG:
        info = PngImagePlugin.PngInfo()
        if infotext:
            info.add_text("parameters", infotext)
        image.save(out, format="PNG", pnginfo=info)
    else:
        exif = Image.Exif()
        if infotext:
            exif.get_ifd(EXIF_IFD_POINTER)[EXIF_USER_COMMENT] = UNICODE_HEADER + infotext.encode("utf-16-be")
        image.save(out, format="JPEG" if fmt == ImageFormat.JPEG else "WEBP", quality=quality, exif=exif.tobytes())
    return out.getvalue()


def read_infotext(data: bytes) -> str:
    """The infotext embedded by encode_image (or by A1111), or "" if none."""
    image = Image.open(io.BytesIO(data))
    if "parameters" in image.info:
        return image.info["parameters"]
    comment = image.getexif().get_ifd(EXIF_IFD_POINTER).get(EXIF_USER_COMMENT)
    if isinstance(comment, bytes) and comment.startswith(UNICODE_HEADER):
        return comment[len(UNICODE_HEADER) :].decode("utf-16-be")
    if isinstance(comment, bytes):
        return comment[8:].decode("utf-8", errors="replace")
    return comment or ""


def to_uint8(images) -> np.ndarray:
    """VAE output in [-1, 1], (B, 3, H, W) torch -> (B, H, W, 3) uint8, rounded as diffusers does."""
    x = (images / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).float().numpy()
    return (x * 255).round().astype("uint8")


def thumbnail(pixels: np.ndarray, max_side: int = 128) -> bytes:
    image = Image.fromarray(pixels, mode="RGB")
    image.thumbnail((max_side, max_side))
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=80)
    return out.getvalue()
