"""A1111 infotext: written as A1111 writes it, embedded in PNG/JPEG/WEBP, read back."""

from __future__ import annotations

import numpy as np
import pytest

from impasto.core.image_encoding import encode_image, read_infotext
from impasto.core.infotext import format_infotext, parse_infotext
from impasto.core.spec import ImageFormat


def sample(**changes):
    args = dict(
        prompt="a red circle, on white",
        negative_prompt="blurry",
        num_steps=20,
        sampler_display_name="DPM++ 2M Karras",
        guidance_scale=7.0,
        seed=42,
        width=512,
        height=768,
        model_hash="0123456789",
        model_name="my model",
    )
    args.update(changes)
    return format_infotext(**args)


def test_matches_a1111_layout():
    text = sample()
    lines = text.split("\n")
    assert lines[0] == "a red circle, on white"
    assert lines[1] == "Negative prompt: blurry"
    assert lines[2].startswith(
        "Steps: 20, Sampler: DPM++ 2M Karras, CFG scale: 7.0, Seed: 42, Size: 512x768, Model hash: 0123456789, Model: my model, Version: impasto "
    )


def test_no_negative_line_when_empty_and_quoted_values():
    text = sample(negative_prompt="", model_name="a, b")
    assert "Negative prompt" not in text
    assert 'Model: "a, b"' in text
    assert parse_infotext(text)["Model"] == "a, b"


def test_parse_round_trip():
    fields = parse_infotext(sample(prompt="line one\nline two"))
    assert fields["Prompt"] == "line one\nline two"
    assert fields["Negative prompt"] == "blurry"
    assert (fields["Steps"], fields["Sampler"], fields["CFG scale"], fields["Seed"], fields["Size"]) == (
        "20",
        "DPM++ 2M Karras",
        "7.0",
        "42",
        "512x768",
    )


@pytest.mark.parametrize("fmt", list(ImageFormat))
def test_embedded_in_every_format(fmt):
    pixels = np.random.default_rng(0).integers(0, 255, (16, 24, 3), dtype=np.uint8)
    text = sample(prompt="ünïcode ✓ prompt")
    data = encode_image(pixels, fmt, text)
    assert read_infotext(data) == text
    if fmt == ImageFormat.PNG:  # lossless
        from io import BytesIO

        from PIL import Image

        assert np.array_equal(np.asarray(Image.open(BytesIO(data))), pixels)
