"""Training examples from a dataset folder: pixels, caption, optional mask.

A folder is read in one of two ways:
- prepared by `impasto prep`: `metadata.jsonl`, one JSON object per line,
  `{"file": "images/0001.png", "caption": "a sks shape", "mask": "masks/0001.png"}` (mask optional),
  images already cropped: used at their own size when both sides are multiples of 8 (aspect
  buckets), else centre-cropped to the model's size;
- raw: every readable image in the folder (not in subfolders), its caption from a sidecar
  `<stem>.txt`, else the job's instance prompt; resized with a centre crop.

A caption may hold `{token}`, replaced by the job's token (the instance or textual-inversion
token). Unreadable images are skipped and reported in `DatasetReport.skipped`, never a crash;
a dataset with no usable image is an error that says why.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
METADATA_FILE = "metadata.jsonl"


@dataclass
class Example:
    pixels: torch.Tensor  # (3, H, W) in [-1, 1], the VAE's input range
    caption: str
    mask: torch.Tensor | None = None  # (1, H, W) in [0, 1]; 1 = the loss counts here
    source: str = ""


@dataclass
class DatasetReport:
    examples: list[Example]
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (file, reason)


def fill_token(text: str, token: str) -> str:
    return text.replace("{token}", token) if token else text


def without_token(caption: str, token: str) -> str:
    """The caption with the token taken out where it stands as a word, and the space before it:
    "a red sks shape" -> "a red shape", "sks" -> "". What `[filewords]` class prompts and the
    token contrast's captions are made of."""
    return re.sub(rf"\s*(?<!\S){re.escape(token)}(?!\S)", "", caption).strip()


def centre_crop_resize(image: Image.Image, size: int) -> Image.Image:
    return ImageOps.fit(image, (size, size), Image.Resampling.LANCZOS, centering=(0.5, 0.5))


def pixels_of(image: Image.Image) -> torch.Tensor:
    a = np.asarray(image.convert("RGB"), dtype=np.uint8)
    return torch.from_numpy(a.copy()).permute(2, 0, 1).float() / 127.5 - 1.0


def mask_of(image: Image.Image, size: tuple[int, int]) -> torch.Tensor:
    m = image.convert("L")
    if m.size != size:
        m = ImageOps.fit(m, size, Image.Resampling.BILINEAR, centering=(0.5, 0.5))
    return torch.from_numpy(np.asarray(m, dtype=np.float32).copy() / 255.0)[None]


def _open(path: Path) -> Image.Image:
    with Image.open(path) as im:
        im.load()
        return im.copy()


def _rows(folder: Path, report: DatasetReport) -> list[dict]:
    """One {"file", "caption"?, "mask"?} per listed image: metadata.jsonl's lines, else the images."""
    if not (folder / METADATA_FILE).is_file():
        return [{"file": p.name} for p in sorted(folder.iterdir()) if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()]
    rows = []
    for n, line in enumerate((folder / METADATA_FILE).read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except ValueError as exc:
                report.skipped.append((f"{METADATA_FILE}:{n}", f"not JSON: {exc}"))
    return rows


def _caption(row: dict, path: Path, default_caption: str) -> str:
    caption = row.get("caption")
    if caption is None:
        sidecar = path.with_suffix(".txt")
        caption = sidecar.read_text(encoding="utf-8").strip() if sidecar.is_file() else default_caption
    return caption


def dataset_captions(folder: Path, *, default_caption: str = "", token: str = "") -> list[str]:
    """The captions of a dataset's listed images, without opening the images (DreamBooth's
    `[filewords]` class prompts are made from them before training starts)."""
    folder = Path(folder)
    return [fill_token(_caption(row, folder / str(row.get("file", "")), default_caption), token) for row in _rows(folder, DatasetReport([]))]


def load_dataset(folder: Path, *, resolution: int, default_caption: str = "", token: str = "", want_masks: bool = False) -> DatasetReport:
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"dataset folder {folder} does not exist")
    report = DatasetReport([])
    prepared = (folder / METADATA_FILE).is_file()
    for row in _rows(folder, report):
        name = str(row.get("file", ""))
        path = (folder / name).resolve()
        if not name or folder.resolve() not in path.parents:
            report.skipped.append((name, "path outside the dataset"))
            continue
        try:
            image = _open(path)
        except Exception as exc:  # PIL raises many types for a bad file
            report.skipped.append((name, f"unreadable: {type(exc).__name__}: {exc}"))
            continue
        if min(image.size) < resolution // 2:
            report.skipped.append((name, f"too small: {image.size[0]}x{image.size[1]}, the short side must be >= {resolution // 2}"))
            continue
        bucketed = prepared and image.size[0] % 8 == 0 and image.size[1] % 8 == 0
        if image.size != (resolution, resolution) and not bucketed:
            image = centre_crop_resize(image.convert("RGB"), resolution)
        caption = _caption(row, path, default_caption)
        mask = None
        if want_masks:
            mask_name = row.get("mask")
            mask_path = (folder / mask_name) if mask_name else None
            if mask_path is None or not mask_path.is_file():
                report.skipped.append((name, "masked loss asked for, but the image has no mask"))
                continue
            try:
                mask = mask_of(_open(mask_path), image.size)
            except Exception as exc:
                report.skipped.append((name, f"mask unreadable: {type(exc).__name__}: {exc}"))
                continue
        report.examples.append(Example(pixels_of(image), fill_token(caption, token), mask, name))
    if not report.examples:
        reasons = "; ".join(f"{f}: {r}" for f, r in report.skipped[:5]) or "no image files"
        raise ValueError(f"dataset {folder.name} has no usable images ({reasons})")
    return report
