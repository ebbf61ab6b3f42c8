"""Bad input ends the stream with INVALID_ARGUMENT naming the field; the server keeps serving."""

from __future__ import annotations

import math

import pytest

from impasto_client import Image, InvalidArgumentError


@pytest.mark.parametrize(
    "options, field",
    [
        ({"width": 60, "height": 64}, "width"),
        ({"width": 64, "height": 66}, "height"),
        ({"width": 64, "height": 0}, "height"),
        ({"width": 4096, "height": 4096}, "width"),
        ({"num_steps": 0}, "num_steps"),
        ({"num_steps": 10_000}, "num_steps"),
        ({"guidance_scale": math.nan}, "guidance_scale"),
        ({"guidance_scale": -1.0}, "guidance_scale"),
        ({"sampler": "euler_z"}, "sampler"),
        ({"model": "no-such-model"}, "model"),
        ({"num_images": 1000}, "num_images"),
    ],
)
def test_bad_field_is_named(client, options, field):
    with pytest.raises(InvalidArgumentError) as info:
        list(client.generate("a circle", **options))
    assert info.value.message.startswith(f"{field}:"), info.value.message


def test_unknown_adapter_is_refused_by_name(client):
    with pytest.raises(InvalidArgumentError) as info:
        list(client.generate("a circle", adapters=[("some-lora", 0.8)]))
    assert info.value.message.startswith("adapters[0].adapter: unknown adapter 'some-lora'"), info.value.message


def test_server_keeps_serving_after_bad_input(client):
    for _ in range(3):
        with pytest.raises(InvalidArgumentError):
            list(client.generate("a circle", width=7, height=7))
    assert any(isinstance(e, Image) for e in client.generate("a circle", num_steps=2, seed=1))
