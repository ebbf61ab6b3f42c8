"""The world of the embedded default model: coloured shapes on plain backgrounds.

One vocabulary serves three users: the training-data generator (training/shapes_dataset.py),
the judge (models/judge.py) that reads the shape and colour words back out of a prompt, and
the later DreamBooth / textual-inversion work that teaches the held-out names.

Images are rendered at 4x and box-downsampled, so edges are anti-aliased like a real photo
of a flat shape and not a jagged polygon; the model then learns shapes, not pixel stairs.
Everything is a pure function of its arguments: a scene drawn from `random.Random(seed)` is
the same image on every machine.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

IMAGE_SIZE = 64  # pixels, square
_SUPERSAMPLE = 4

# Order matters: it is the class index order of the judge. Append only.
SHAPES = ("circle", "square", "triangle", "diamond", "cross", "star")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "orange": (245, 140, 20),
    "yellow": (240, 220, 30),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "purple": (140, 50, 190),
    "pink": (255, 120, 200),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (245, 245, 245),
    "black": (15, 15, 15),
    "gray": (128, 128, 128),
}

# Never shown to the base model; the judge knows them. Later training issues teach them.
HELD_OUT_SHAPE = "star"
HELD_OUT_COLOUR = "pink"
SEEN_SHAPES = tuple(s for s in SHAPES if s != HELD_OUT_SHAPE)
SEEN_COLOURS = tuple(c for c in COLOURS if c != HELD_OUT_COLOUR)

# Shape radius (centre to the farthest point) in pixels of the 64-pixel image.
MIN_RADIUS, MAX_RADIUS = 12, 24
_MARGIN = 2


@dataclass(frozen=True)
class Scene:
    """Everything needed to draw one image; the caption is derived from it."""

    shape: str
    colour: str
    background: str
    cx: float  # centre, pixels
    cy: float
    radius: float
    # Small per-image variation of the fill, so "red" is a neighbourhood, not one RGB value.
    colour_jitter: tuple[int, int, int] = (0, 0, 0)

    def caption(self) -> str:
        return caption(self.shape, self.colour, self.background)


def caption(shape: str | None, colour: str | None, background: str | None) -> str:
    """The caption template. Any part may be left out: "a red circle", "a circle", "red".

    Parts are dropped during training so that short prompts and negative prompts ("red")
    mean something to the model.
    """
    if shape is None and colour is None:
        return "" if background is None else f"a {background} background"
    words = f"{colour} {shape or 'shape'}" if colour is not None else (shape or "shape")
    text = ("an " if words[0] in "aeiou" else "a ") + words
    if background is not None:
        text += f" on a {background} background"
    return text


def sample_scene(
    rng: random.Random,
    shapes: tuple[str, ...] = SEEN_SHAPES,
    colours: tuple[str, ...] = SEEN_COLOURS,
    jitter: int = 12,
) -> Scene:
    """One random scene from `rng`, using only the given shapes and colours."""
    radius = rng.uniform(MIN_RADIUS, MAX_RADIUS)
    lo, hi = radius + _MARGIN, IMAGE_SIZE - radius - _MARGIN
    return Scene(
        shape=rng.choice(shapes),
        colour=rng.choice(colours),
        background=rng.choice(tuple(BACKGROUNDS)),
        cx=rng.uniform(lo, hi),
        cy=rng.uniform(lo, hi),
        radius=radius,
        colour_jitter=tuple(rng.randint(-jitter, jitter) for _ in range(3)),
    )


def _polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    if shape == "square":
        h = r / math.sqrt(2)  # corners on the circle of radius r
        return [(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    if shape == "diamond":
        return [(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)]
    if shape == "triangle":
        # Equilateral, point up, centred on its circumcircle.
        return [(cx + r * math.sin(a), cy - r * math.cos(a)) for a in (0, 2 * math.pi / 3, 4 * math.pi / 3)]
    if shape == "star":
        pts = []
        for i in range(10):
            a = i * math.pi / 5
            rr = r if i % 2 == 0 else r * 0.42
            pts.append((cx + rr * math.sin(a), cy - rr * math.cos(a)))
        return pts
    if shape == "cross":
        a, b = r * 0.75, r * 0.28  # arm half-length and half-width
        return [
            (cx - b, cy - a), (cx + b, cy - a), (cx + b, cy - b), (cx + a, cy - b),
            (cx + a, cy + b), (cx + b, cy + b), (cx + b, cy + a), (cx - b, cy + a),
            (cx - b, cy + b), (cx - a, cy + b), (cx - a, cy - b), (cx - b, cy - b),
        ]  # fmt: skip
    raise ValueError(f"unknown shape {shape!r}; known: {SHAPES}")


def render(scene: Scene) -> np.ndarray:
    """The scene as a uint8 array of shape (IMAGE_SIZE, IMAGE_SIZE, 3)."""
    s = _SUPERSAMPLE
    big = Image.new("RGB", (IMAGE_SIZE * s, IMAGE_SIZE * s), BACKGROUNDS[scene.background])
    draw = ImageDraw.Draw(big)
    fill = tuple(int(np.clip(c + j, 0, 255)) for c, j in zip(COLOURS[scene.colour], scene.colour_jitter))
    cx, cy, r = scene.cx * s, scene.cy * s, scene.radius * s
    if scene.shape == "circle":
        rc = r * 0.9  # a circle of the full radius looks bigger than the polygons
        draw.ellipse((cx - rc, cy - rc, cx + rc, cy + rc), fill=fill)
    else:
        draw.polygon(_polygon(scene.shape, cx, cy, r), fill=fill)
    small = big.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BOX)
    return np.asarray(small, dtype=np.uint8)


def find_word(prompt: str, words) -> str | None:
    """The first of `words` that appears in `prompt` as a whole word, or None."""
    tokens = prompt.lower().replace(",", " ").split()
    for t in tokens:
        if t in words:
            return t
    return None
