"""Defaults are resolved from the model; every bad field is refused by name."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from impasto.config import Limits
from impasto.core.errors import InvalidArgument
from impasto.core.model_registry import GenerationDefaults, ModelEntry
from impasto.core.spec import AdapterWeight, GenerationSpec
from impasto.core.validation import resolve_spec

MODEL = ModelEntry("m", Path("."), defaults=GenerationDefaults(20, 7.0, "euler_a"), default_width=512, default_height=512)
LIMITS = Limits(max_pixels=1024 * 1024, max_steps=100, max_images_per_request=4)


def test_defaults_come_from_the_model():
    r = resolve_spec(GenerationSpec(prompt="x"), MODEL, LIMITS)
    assert (r.width, r.height, r.num_steps, r.guidance_scale, r.sampler, r.num_images) == (512, 512, 20, 7.0, "euler_a", 1)
    assert 0 <= r.seed < 2**32


def test_explicit_values_are_kept():
    spec = GenerationSpec(prompt="x", width=256, height=128, num_steps=5, guidance_scale=0.0, sampler="ddim", seed=2**40, num_images=2)
    r = resolve_spec(spec, MODEL, LIMITS)
    assert (r.width, r.height, r.num_steps, r.guidance_scale, r.sampler, r.seed, r.num_images) == (256, 128, 5, 0.0, "ddim", 2**40, 2)
    assert not r.uses_cfg


@pytest.mark.parametrize(
    "changes, field",
    [
        ({"width": 100, "height": 64}, "width"),
        ({"width": 64, "height": 0}, "height"),
        ({"width": 2048, "height": 2048}, "width"),
        ({"num_steps": 0}, "num_steps"),
        ({"num_steps": 101}, "num_steps"),
        ({"guidance_scale": math.nan}, "guidance_scale"),
        ({"guidance_scale": math.inf}, "guidance_scale"),
        ({"guidance_scale": -0.5}, "guidance_scale"),
        ({"sampler": "nope"}, "sampler"),
        ({"num_images": 5}, "num_images"),
        ({"seed": 2**64 - 1, "num_images": 2}, "seed"),
        ({"prompt": "x" * 30_000}, "prompt"),
    ],
)
def test_bad_fields_are_named(changes, field):
    spec = GenerationSpec(**{"prompt": "x", **changes})
    with pytest.raises(InvalidArgument) as info:
        resolve_spec(spec, MODEL, LIMITS)
    assert info.value.field == field and str(info.value).startswith(f"{field}:")


def test_adapter_refs_are_checked_for_form():
    # Whether the adapter exists is the adapter registry's check (image_engine); here, the form.
    resolve_spec(GenerationSpec(prompt="x", adapters=(AdapterWeight("a", 1.0),)), MODEL, LIMITS)
    with pytest.raises(InvalidArgument, match=r"^adapters\[1\].adapter: must name"):
        resolve_spec(GenerationSpec(prompt="x", adapters=(AdapterWeight("a"), AdapterWeight(""))), MODEL, LIMITS)
    with pytest.raises(InvalidArgument, match=r"^adapters\[0\].weight: must be a finite"):
        resolve_spec(GenerationSpec(prompt="x", adapters=(AdapterWeight("a", math.inf),)), MODEL, LIMITS)
