"""The coloured-shapes training set: rendered images, their scenes, and captions with parts dropped.

The default model's recipe and the judge's recipe both draw from here, and the DreamBooth /
textual-inversion trainers use `render_scenes` to make their few instance images of the
held-out shape and colour.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch

from impasto.models.shapes import (
    BACKGROUNDS,
    COLOURS,
    IMAGE_SIZE,
    MAX_RADIUS,
    MIN_RADIUS,
    SEEN_COLOURS,
    SEEN_SHAPES,
    SHAPES,
    Scene,
    caption,
    render,
    sample_scene,
)


@dataclass(frozen=True)
class CaptionDropout:
    """How often each part of the caption is left out during training.

    Dropping parts teaches the model short prompts ("a circle") and single words ("red"),
    which negative prompts need; the empty caption is the unconditional branch that
    classifier-free guidance subtracts.
    """

    p_empty: float = 0.1
    p_drop_colour: float = 0.15
    p_drop_shape: float = 0.15
    p_drop_background: float = 0.5
    p_bare_colour: float = 0.5  # when only the colour is left: "red" instead of "a red shape"


def training_caption(scene: Scene, rng: random.Random, dropout: CaptionDropout = CaptionDropout(), unnamed: tuple[str, ...] = ()) -> str:
    """A caption with parts dropped at random; words in `unnamed` are never written (a scene
    may show a shape or colour whose word the model must not learn)."""
    if rng.random() < dropout.p_empty:
        return ""
    colour = None if rng.random() < dropout.p_drop_colour or scene.colour in unnamed else scene.colour
    shape = None if rng.random() < dropout.p_drop_shape or scene.shape in unnamed else scene.shape
    background = None if rng.random() < dropout.p_drop_background else scene.background
    if shape is None and background is None and colour is not None and rng.random() < dropout.p_bare_colour:
        return colour
    return caption(shape, colour, background)


def sample_scenes(
    num: int,
    seed: int,
    shapes: tuple[str, ...] = SEEN_SHAPES,
    colours: tuple[str, ...] = SEEN_COLOURS,
    jitter: int = 12,
) -> list[Scene]:
    """`num` scenes, a pure function of the seed. Defaults exclude the held-out shape and colour."""
    rng = random.Random(seed)
    return [sample_scene(rng, shapes, colours, jitter) for _ in range(num)]


def sample_blend_scenes(
    num: int, seed: int, avoid: tuple[int, int, int], min_distance: float, keep: Callable[[list[Scene]], list[bool]] | None = None
) -> list[tuple[Scene, str]]:
    """`num` scenes of seen shapes filled with colours between the seen ones, each with the
    words for its colour: two seen colours ("red purple", the first weighing more), or one
    lightened or darkened ("light red", "dark blue"). Fills within `min_distance` (RGB) of
    `avoid` are skipped, and so are scenes `keep` rejects (it sees candidates in batches): RGB
    distance alone is not what the judge calls a colour, and the colour held out must stay
    unseen. A scene's colour is its first word's and its jitter carries the rest of the way to
    the blend, so `render` draws it unchanged."""
    rng = random.Random(seed)
    out: list[tuple[Scene, str]] = []
    while len(out) < num:
        candidates: list[tuple[Scene, str]] = []
        while len(candidates) < min(512, num - len(out)):
            kind = rng.random()
            name = rng.choice(SEEN_COLOURS)
            base = np.array(COLOURS[name], dtype=float)
            if kind < 0.5:
                other = rng.choice([c for c in SEEN_COLOURS if c != name])
                t = rng.uniform(0.3, 0.5)
                rgb, words = (1 - t) * base + t * np.array(COLOURS[other]), f"{name} {other}"
            elif kind < 0.75:
                t = rng.uniform(0.3, 0.6)
                rgb, words = (1 - t) * base + t * 255.0, f"light {name}"
            else:
                t = rng.uniform(0.3, 0.6)
                rgb, words = (1 - t) * base, f"dark {name}"
            if np.linalg.norm(rgb - np.array(avoid)) < min_distance:
                continue
            radius = rng.uniform(MIN_RADIUS, MAX_RADIUS)
            lo, hi = radius + 2, IMAGE_SIZE - radius - 2
            shape, background = rng.choice(SEEN_SHAPES), rng.choice(tuple(BACKGROUNDS))
            cx, cy = rng.uniform(lo, hi), rng.uniform(lo, hi)
            jitter = tuple(int(round(x)) for x in rgb - base)
            candidates.append((Scene(shape, name, background, cx, cy, radius, jitter), words))
        verdicts = keep([scene for scene, _ in candidates]) if keep else [True] * len(candidates)
        out += [c for c, ok in zip(candidates, verdicts) if ok]
    return out[:num]


def render_scenes(scenes: list[Scene]) -> np.ndarray:
    """uint8 array (N, 64, 64, 3)."""
    return np.stack([render(s) for s in scenes])


def to_model_pixels(images_uint8: np.ndarray) -> torch.Tensor:
    """(N, H, W, 3) uint8 -> (N, 3, H, W) float in [-1, 1], the VAE's input range."""
    x = torch.from_numpy(np.ascontiguousarray(images_uint8)).permute(0, 3, 1, 2).float()
    return x / 127.5 - 1.0


def scene_labels(scenes: list[Scene]) -> tuple[torch.Tensor, torch.Tensor]:
    """Class indices (shape, colour) in the order of SHAPES and COLOURS; the judge's targets."""
    colour_names = tuple(COLOURS)
    shape_idx = torch.tensor([SHAPES.index(s.shape) for s in scenes])
    colour_idx = torch.tensor([colour_names.index(s.colour) for s in scenes])
    return shape_idx, colour_idx


class CaptionTokenizer:
    """Token ids exactly as StableDiffusionPipeline makes them (pad to 77 with <|endoftext|>).

    The slow CLIP BPE tokenizer costs milliseconds per caption and the set of captions is
    small, so ids are cached per caption.
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self._ids = lru_cache(maxsize=None)(self._encode)

    def _encode(self, text: str) -> tuple[int, ...]:
        return tuple(
            self.tokenizer(
                text, padding="max_length", max_length=self.tokenizer.model_max_length, truncation=True
            ).input_ids
        )

    def __call__(self, captions: list[str]) -> torch.Tensor:
        return torch.tensor([self._ids(c) for c in captions], dtype=torch.long)
