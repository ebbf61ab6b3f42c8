"""`impasto prep`: a folder of images -> a training dataset the trainers read (data.py).

    impasto prep photos/ --out ~/.local/share/impasto/datasets/cat --size 512 --crop bucket \\
        --caption template --template "a photo of {token} cat" --token sks --masks masks/

- Resize and crop: `center` and `random` crop to size x size after scaling the short side;
  `bucket` keeps the aspect ratio: each image goes to the bucket (w, h), multiples of 8 with
  about size x size pixels, whose aspect is closest to its own (kohya's aspect-ratio buckets).
- Captions: `sidecar` (<stem>.txt beside the image, falling back to the template), `filename`
  (the stem, '_' and '-' as spaces), or `template` (the same text for all; `{token}` stays in the
  caption and is filled by the job, or is replaced now with --token).
- Masks (optional): a folder of greyscale images named like the images (<stem>.png); each is
  cropped exactly as its image. White = the loss counts there.
- Output: images/NNNNN.png, masks/NNNNN.png, metadata.jsonl (one line per image: file, caption,
  mask, source, width, height) and report.json. Corrupt, unreadable and too-small images (and
  images whose mask is missing when masks are asked for) are listed in the report and skipped;
  they never stop the run.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, ImageOps

from impasto.atomic_files import atomic_directory

from .data import IMAGE_SUFFIXES, METADATA_FILE

CROPS = ("center", "random", "bucket")
CAPTIONS = ("sidecar", "filename", "template")
REPORT_FILE = "report.json"


@dataclass
class PrepConfig:
    source: str
    out: str
    size: int = 64
    crop: str = "center"
    caption: str = "sidecar"
    template: str = "a {token}"
    token: str = ""  # given: replaces {token} now; empty: {token} stays for the job to fill
    masks: str = ""  # a folder of masks named like the images
    min_size: int = 0  # 0: half of size; smaller images are skipped, not upscaled past 2x
    seed: int = 0
    bucket_step: int = 8
    overwrite: bool = False

    def validate(self) -> None:
        if self.crop not in CROPS:
            raise ValueError(f"crop must be one of {CROPS}, got {self.crop!r}")
        if self.caption not in CAPTIONS:
            raise ValueError(f"caption must be one of {CAPTIONS}, got {self.caption!r}")
        if self.size < 8 or self.size % 8:
            raise ValueError(f"size must be a multiple of 8, got {self.size}")


@dataclass
class PrepReport:
    kept: list[dict] = field(default_factory=list)
    skipped: list[dict] = field(default_factory=list)  # {"file", "reason"}

    def summary(self) -> str:
        lines = [f"kept {len(self.kept)} images, skipped {len(self.skipped)}"]
        lines += [f"  skipped {s['file']}: {s['reason']}" for s in self.skipped]
        return "\n".join(lines)


def buckets(size: int, step: int = 8, max_ratio: float = 2.0) -> list[tuple[int, int]]:
    """(w, h) pairs, multiples of `step`, with w*h <= size*size, aspect within 1/max_ratio..max_ratio."""
    out, area = set(), size * size
    w = step
    while w <= size * max_ratio:
        h = min(int(area / w) // step * step, int(w * max_ratio) // step * step)
        if h >= step and max(w / h, h / w) <= max_ratio:
            out.add((w, h))
        w += step
    return sorted(out)


def nearest_bucket(width: int, height: int, options: list[tuple[int, int]]) -> tuple[int, int]:
    import math

    ratio = math.log(width / height)
    return min(options, key=lambda b: (abs(math.log(b[0] / b[1]) - ratio), -b[0] * b[1]))


def _crop_box(w: int, h: int, tw: int, th: int, mode: str, rng: random.Random) -> tuple[float, float, float, float]:
    """The region of the source (w, h) that becomes the target (tw, th): the largest with the
    target's aspect, centred or at a random place."""
    scale = min(w / tw, h / th)
    cw, ch = tw * scale, th * scale
    if mode == "random":
        left, top = rng.uniform(0, w - cw), rng.uniform(0, h - ch)
    else:
        left, top = (w - cw) / 2, (h - ch) / 2
    return left, top, left + cw, top + ch


def caption_for(path: Path, cfg: PrepConfig) -> str:
    if cfg.caption == "sidecar":
        sidecar = path.with_suffix(".txt")
        text = sidecar.read_text(encoding="utf-8").strip() if sidecar.is_file() else cfg.template
    elif cfg.caption == "filename":
        text = path.stem.replace("_", " ").replace("-", " ").strip()
    else:
        text = cfg.template
    return text.replace("{token}", cfg.token) if cfg.token else text


def _open_rgb(path: Path) -> Image.Image:
    with Image.open(path) as im:
        im.load()
        im = ImageOps.exif_transpose(im)
        return im.convert("RGB")


def prepare(cfg: PrepConfig) -> PrepReport:
    cfg.validate()
    source, out = Path(cfg.source), Path(cfg.out)
    if not source.is_dir():
        raise FileNotFoundError(f"{source} is not a folder")
    if out.exists() and not cfg.overwrite:
        raise FileExistsError(f"{out} exists; pass --overwrite to replace it")
    rng = random.Random(cfg.seed)
    min_size = cfg.min_size or cfg.size // 2
    options = buckets(cfg.size, cfg.bucket_step)
    report = PrepReport()
    with atomic_directory(out, overwrite=cfg.overwrite) as tmp:
        (tmp / "images").mkdir()
        if cfg.masks:
            (tmp / "masks").mkdir()
        files = sorted(p for p in source.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        rows = []
        for path in files:
            try:
                image = _open_rgb(path)
            except Exception as exc:  # PIL raises many types for a bad file; never stop the run
                report.skipped.append({"file": path.name, "reason": f"unreadable: {type(exc).__name__}: {exc}"})
                continue
            w, h = image.size
            if min(w, h) < min_size:
                report.skipped.append({"file": path.name, "reason": f"too small: {w}x{h}, the short side must be >= {min_size}"})
                continue
            mask = None
            if cfg.masks:
                mask_path = next((p for p in (Path(cfg.masks) / f"{path.stem}{s}" for s in (".png", ".jpg", ".webp")) if p.is_file()), None)
                if mask_path is None:
                    report.skipped.append({"file": path.name, "reason": "no mask"})
                    continue
                try:
                    with Image.open(mask_path) as m:
                        mask = m.convert("L")
                except Exception as exc:
                    report.skipped.append({"file": path.name, "reason": f"mask unreadable: {type(exc).__name__}: {exc}"})
                    continue
                if mask.size != image.size:
                    report.skipped.append({"file": path.name, "reason": f"mask is {mask.size[0]}x{mask.size[1]}, image {w}x{h}"})
                    continue
            tw, th = nearest_bucket(w, h, options) if cfg.crop == "bucket" else (cfg.size, cfg.size)
            box = _crop_box(w, h, tw, th, cfg.crop, rng)
            name = f"{len(rows):05d}.png"
            image.resize((tw, th), Image.Resampling.LANCZOS, box=box).save(tmp / "images" / name)
            row = {"file": f"images/{name}", "caption": caption_for(path, cfg), "source": path.name, "width": tw, "height": th}
            if mask is not None:
                mask.resize((tw, th), Image.Resampling.BILINEAR, box=box).save(tmp / "masks" / name)
                row["mask"] = f"masks/{name}"
            rows.append(row)
        report.kept = rows
        (tmp / METADATA_FILE).write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        (tmp / REPORT_FILE).write_text(json.dumps({"kept": len(rows), "skipped": report.skipped, "config": cfg.__dict__}, indent=2))
    return report
