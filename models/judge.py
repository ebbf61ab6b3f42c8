"""The judge: a small CNN that names the shape and colour in a 64x64 image, and scores prompts.

It knows every shape and colour of models/shapes.py, the held-out ones included, so it can
also score DreamBooth / textual-inversion results. Weights ship in models/shapes_judge/
(trained by models/train_judge.py, with the accuracy it reached in its config.json).

    result = judge(images, ["a red circle on a white background", ...])
    result.hit_rate, result.per_class["shape"]["circle"], result.per_class["pair"]["red circle"]

A prompt asks for the shape and colour words it contains; a part it does not name is not
checked ("a circle" is a hit for a circle of any colour). A prompt that names neither is an
error: there is nothing to judge. A hit also needs the image to be well formed (one solid shape
on a flat background, well_formed.py): the CNN names a shape for anything, specks included.
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file
from torch import nn

from impasto.models import judge_weights_path
from impasto.models.shapes import COLOURS, IMAGE_SIZE, SHAPES, find_word
from impasto.models.well_formed import well_formed

COLOUR_NAMES = tuple(COLOURS)


class ShapesJudgeNet(nn.Module):
    """Four conv stages (64 -> 8 pixels), global average pool, one linear head per question."""

    def __init__(self, widths: tuple[int, ...] = (32, 48, 64, 96)):
        super().__init__()
        layers, c_in = [], 3
        for i, c in enumerate(widths):
            layers += [nn.Conv2d(c_in, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU(inplace=True)]
            if i < len(widths) - 1:
                layers.append(nn.MaxPool2d(2))
            c_in = c
        self.features = nn.Sequential(*layers)
        self.shape_head = nn.Linear(c_in, len(SHAPES))
        self.colour_head = nn.Linear(c_in, len(COLOURS))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x: (N, 3, 64, 64) in [0, 1]. Returns (shape logits, colour logits)."""
        h = self.features(x).mean(dim=(2, 3))
        return self.shape_head(h), self.colour_head(h)


def as_arrays(images) -> list[np.ndarray]:
    """PIL images or uint8 arrays (H, W, 3) / (N, H, W, 3) -> checked uint8 (64, 64, 3) arrays."""
    if isinstance(images, np.ndarray) and images.ndim == 4:
        arrays = list(images)
    else:
        arrays = [np.asarray(im.convert("RGB") if hasattr(im, "convert") else im) for im in images]
    for a in arrays:
        if a.dtype != np.uint8 or a.shape != (IMAGE_SIZE, IMAGE_SIZE, 3):
            raise ValueError(f"judge expects {IMAGE_SIZE}x{IMAGE_SIZE} RGB uint8 images, got {a.dtype} {a.shape}")
    return arrays


def to_judge_input(images) -> torch.Tensor:
    """PIL images or uint8 arrays (H, W, 3) / (N, H, W, 3) -> float (N, 3, 64, 64) in [0, 1]."""
    x = torch.from_numpy(np.stack(as_arrays(images))).permute(0, 3, 1, 2).float()
    return x / 255.0


@lru_cache(maxsize=1)
def load_judge(folder: str | None = None) -> ShapesJudgeNet:
    folder = Path(folder) if folder else judge_weights_path()
    config = json.loads((folder / "config.json").read_text())
    if tuple(config["shapes"]) != SHAPES or tuple(config["colours"]) != COLOUR_NAMES:
        raise ValueError(f"judge weights in {folder} were trained for other classes: {config['shapes']} {config['colours']}")
    net = ShapesJudgeNet(tuple(config["widths"]))
    net.load_state_dict(load_file(folder / "model.safetensors"))
    return net.eval()


@torch.no_grad()
def classify(images, net: ShapesJudgeNet | None = None) -> list[tuple[str, str]]:
    """(shape, colour) predicted for each image."""
    net = net or load_judge()
    shape_logits, colour_logits = net(to_judge_input(images))
    return [(SHAPES[s], COLOUR_NAMES[c]) for s, c in zip(shape_logits.argmax(1).tolist(), colour_logits.argmax(1).tolist())]


def expected_from_prompt(prompt: str) -> tuple[str | None, str | None]:
    """The (shape, colour) a prompt asks for; None for a part it does not name."""
    shape, colour = find_word(prompt, SHAPES), find_word(prompt, COLOURS)
    if shape is None and colour is None:
        raise ValueError(f"prompt names no shape or colour the judge knows: {prompt!r}")
    return shape, colour


@dataclass
class JudgeResult:
    hit_rate: float  # fraction of images that show everything their prompt asked for
    # "shape" -> {name: rate}, "colour" -> {name: rate}, "pair" -> {"red circle": rate}; each
    # rate is the hit rate of the images whose prompt asked for that class.
    per_class: dict[str, dict[str, float]]
    predictions: list[tuple[str, str]]  # (shape, colour) per image
    hits: list[bool] = field(default_factory=list)
    well_formed: list[bool] = field(default_factory=list)  # one solid shape on a flat background

    @property
    def well_formed_rate(self) -> float:
        return sum(self.well_formed) / len(self.well_formed) if self.well_formed else 0.0


def judge(images, prompts: list[str], net: ShapesJudgeNet | None = None) -> JudgeResult:
    """Score images against the prompts that made them."""
    if len(images) != len(prompts):
        raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
    arrays = as_arrays(images)  # once, for the CNN and the well-formed check
    predictions = classify(arrays, net)
    formed = [well_formed(a) for a in arrays]
    hits, groups = [], defaultdict(list)
    for (p_shape, p_colour), prompt, ok in zip(predictions, prompts, formed):
        shape, colour = expected_from_prompt(prompt)
        hit = ok and (shape is None or p_shape == shape) and (colour is None or p_colour == colour)
        hits.append(hit)
        if shape is not None:
            groups["shape", shape].append(hit)
        if colour is not None:
            groups["colour", colour].append(hit)
        if shape is not None and colour is not None:
            groups["pair", f"{colour} {shape}"].append(hit)
    per_class: dict[str, dict[str, float]] = {"shape": {}, "colour": {}, "pair": {}}
    for (kind, name), values in sorted(groups.items()):
        per_class[kind][name] = sum(values) / len(values)
    return JudgeResult(sum(hits) / len(hits), per_class, predictions, hits, formed)
