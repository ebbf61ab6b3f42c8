"""Generate over real gRPC: event order, seeds, formats and infotext, previews."""

from __future__ import annotations

import io

import pytest
from PIL import Image as PILImage

from image_checks import pixels, psnr
from impasto.core.image_encoding import read_infotext
from impasto.config import SchedulerConfig
from impasto.core.infotext import parse_infotext
from impasto_client import Done, Image, Progress, Queued, Started

PROMPT = "a red circle on a white background"


def run(client, **options):
    return list(client.generate(options.pop("prompt", PROMPT), **options))


def test_events_come_in_order(client):
    events = run(client, seed=7, num_steps=6, progress_interval_ms=0)
    kinds = [type(e) for e in events]
    while kinds and kinds[0] is Queued:
        kinds.pop(0)
    assert kinds[0] is Started
    progress = [e for e in events if isinstance(e, Progress)]
    assert [p.step for p in progress] == list(range(1, 7))
    assert all(p.num_steps == 6 for p in progress)
    assert progress[-1].eta_seconds == 0
    assert kinds[-2:] == [Image, Done]
    assert len({e.request_id for e in events}) == 1


def test_progress_is_paced_by_default_but_keeps_first_and_last(client):
    # How many go by default depends on this machine's step time (tests/unit/test_progress_pacing.py
    # has the clock); the first and the last always go.
    steps = [e.step for e in run(client, seed=7, num_steps=40) if isinstance(e, Progress)]
    assert steps[0] == 1 and steps[-1] == 40
    assert [e.step for e in run(client, seed=7, num_steps=40, progress_interval_ms=60_000) if isinstance(e, Progress)] == [1, 40]
    assert [e.step for e in run(client, seed=7, num_steps=40, progress_interval_ms=0) if isinstance(e, Progress)] == list(range(1, 41))
    previews = [e.step for e in run(client, seed=7, num_steps=8, preview_every=2, progress_interval_ms=60_000) if isinstance(e, Progress)]
    assert previews == [1, 2, 4, 6, 8]


def test_seed_is_reported_and_reproducible(client):
    first = run(client, num_steps=4)
    seed = next(e for e in first if isinstance(e, Started)).seed
    image_a = next(e for e in first if isinstance(e, Image))
    again = run(client, num_steps=4, seed=seed)
    image_b = next(e for e in again if isinstance(e, Image))
    assert image_a.seed == image_b.seed == seed
    assert image_a.data == image_b.data


def test_batch_of_images_uses_seed_plus_index(client):
    batch = [e for e in run(client, seed=100, num_steps=4, num_images=3) if isinstance(e, Image)]
    assert [i.index for i in batch] == [0, 1, 2]
    assert [i.seed for i in batch] == [100, 101, 102]
    # Image 2 of the batch is the image a single request with seed 102 makes (up to the
    # float rounding of a larger UNet batch).
    single = next(e for e in run(client, seed=102, num_steps=4) if isinstance(e, Image))
    assert psnr(pixels(batch[2].data), pixels(single.data)) >= 45
    assert parse_infotext(batch[2].infotext)["Seed"] == "102"


@pytest.mark.parametrize("fmt, mime", [("png", "image/png"), ("jpeg", "image/jpeg"), ("webp", "image/webp")])
def test_infotext_round_trips_through_each_format(client, fmt, mime):
    image = next(
        e
        for e in run(client, prompt="a green, tiny square", negative_prompt="red", seed=11, num_steps=3, image_format=fmt, sampler="dpmpp_2m_karras", guidance_scale=6.5)
        if isinstance(e, Image)
    )
    assert image.mime_type == mime
    assert PILImage.open(io.BytesIO(image.data)).format == {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}[fmt]
    embedded = read_infotext(image.data)
    assert embedded == image.infotext
    fields = parse_infotext(embedded)
    assert fields["Prompt"] == "a green, tiny square"
    assert fields["Negative prompt"] == "red"
    assert fields["Steps"] == "3"
    assert fields["Sampler"] == "DPM++ 2M Karras"
    assert fields["CFG scale"] == "6.5"
    assert fields["Seed"] == "11"
    assert fields["Size"] == "64x64"
    assert len(fields["Model hash"]) == 10


def test_previews_arrive_when_asked(client):
    events = run(client, seed=1, num_steps=6, preview_every=2)
    previews = [e for e in events if isinstance(e, Progress) and e.preview]
    assert [p.step for p in previews] == [2, 4]
    assert previews[0].preview_mime_type == "image/jpeg"
    assert PILImage.open(io.BytesIO(previews[0].preview)).format == "JPEG"
    assert not any(isinstance(e, Progress) and e.preview for e in run(client, seed=1, num_steps=3))


def test_long_prompts_are_chunked_not_cut(client):
    # 90+ tokens: A1111 encodes two 75-token chunks; the words past 75 must change the image.
    base = ", ".join(["a red circle on a white background"] * 11)
    a = next(e for e in run(client, prompt=base + ", blue", seed=3, num_steps=3) if isinstance(e, Image))
    b = next(e for e in run(client, prompt=base + ", green", seed=3, num_steps=3) if isinstance(e, Image))
    assert a.data != b.data


def test_lists_models_samplers_and_server_info(client):
    models = client.list_models()
    default = next(m for m in models if m.is_default)
    assert default.available and len(default.hash) == 10 and default.sha256.startswith(default.hash)
    assert (default.default_width, default.default_height) == (64, 64)
    names = {s.name for s in client.list_samplers()}
    assert {"euler", "euler_a", "heun", "lms", "ddim", "pndm", "dpmpp_2m", "dpmpp_2m_karras", "dpmpp_sde_karras", "unipc", "lcm"} <= names
    info = client.server_info()
    assert info.version and info.default_model == default.name
    backends = {b.name: b for b in info.backends}
    assert backends["torch"].available
    if not backends["tensorrt"].available:
        assert backends["tensorrt"].reason  # says why, e.g. no NVIDIA GPU
    assert info.limits.max_steps > 0
    defaults = SchedulerConfig()
    assert info.scheduler.fast_lane_max_steps == defaults.fast_lane_max_steps
    assert info.scheduler.fast_lane_max_stretch == pytest.approx(defaults.fast_lane_max_stretch)
    assert {e.component for e in info.engines} >= {"text_encoder", "unet", "vae_decoder"}
