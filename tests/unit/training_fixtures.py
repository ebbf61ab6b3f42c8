"""Tiny components for the trainer and job tests: the embedded model's architecture (text width
32, a UNet of ~1M parameters) with random weights, and small datasets of rendered shapes.

Built once per test process; no test depends on the shipped default model's weights.
"""

from __future__ import annotations

import functools
import random
import shutil
import tempfile
from pathlib import Path

import torch
from PIL import Image

from impasto.models.shapes import Scene, render

_ROOT: Path | None = None


def _root() -> Path:
    global _ROOT
    if _ROOT is None:
        import atexit

        _ROOT = Path(tempfile.mkdtemp(prefix="impasto-training-tests-"))
        atexit.register(shutil.rmtree, _ROOT, True)
    return _ROOT


@functools.cache
def tiny_model_dir() -> Path:
    from impasto.models.architecture import build_text_encoder, build_unet, build_vae, write_pipeline_folder

    torch.manual_seed(0)
    folder = _root() / "model"
    write_pipeline_folder(folder, build_vae().eval(), build_unet().eval(), build_text_encoder().eval())
    return folder


def write_shapes(folder: Path, shapes: list[tuple[str, str]], captions: list[str] | None = None, seed: int = 0) -> Path:
    """One PNG per (shape, colour), with a sidecar caption when given."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    for i, (shape, colour) in enumerate(shapes):
        r = rng.uniform(14, 22)
        scene = Scene(shape, colour, rng.choice(["white", "gray", "black"]), rng.uniform(r + 2, 62 - r), rng.uniform(r + 2, 62 - r), r)
        Image.fromarray(render(scene)).save(folder / f"{i:03d}.png")
        if captions:
            (folder / f"{i:03d}.txt").write_text(captions[i])
    return folder


@functools.cache
def star_dataset() -> Path:
    colours = ["red", "blue", "green", "yellow"]
    return write_shapes(_root() / "stars", [("star", c) for c in colours], [f"a {c} {{token}} shape" for c in colours])


def fixed_batch_seed(tuner) -> None:
    """Reset the generator before every step: the same batch, noise and timesteps each time, so
    the loss must fall if the step learns anything."""
    state = tuner.generator.get_state()
    original = tuner.train_step

    def step():
        tuner.generator.set_state(state)
        return original()

    tuner.train_step = step
