"""The embedded default model (a tiny Stable Diffusion trained on coloured shapes) and its judge.

`default_model_path()` is the diffusers folder the server loads when no model is configured;
`DEFAULT_SETTINGS` are the generation settings the model was tuned and measured with
(benchmarks/default_model_quality.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

DEFAULT_MODEL_NAME = "impasto-shapes-v2"


@dataclass(frozen=True)
class GenerationDefaults:
    """Recommended settings for the default model. Sampler names follow A1111."""

    num_inference_steps: int = 20
    guidance_scale: float = 4.0  # measured best for this model (benchmarks/default_model_quality.py)
    sampler: str = "euler_a"
    width: int = 64
    height: int = 64


DEFAULT_SETTINGS = GenerationDefaults()


def default_model_path() -> Path:
    """The folder of the embedded default model (diffusers StableDiffusionPipeline layout)."""
    return Path(__file__).resolve().parent / "default"


def judge_weights_path() -> Path:
    """The folder of the shape-and-colour judge's weights (see models/judge.py)."""
    return Path(__file__).resolve().parent / "shapes_judge"
