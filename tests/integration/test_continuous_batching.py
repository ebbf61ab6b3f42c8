"""Step-level batching: an image is the same whether its request ran alone or batched with
others at other steps, with other samplers, step counts and guidance scales."""

from __future__ import annotations

import threading
import urllib.request

import numpy as np

from image_checks import pixels, psnr
from impasto_client import Image, ImpastoClient, Progress

from conftest import running_server

# (sampler, steps, guidance, size): two batch keys, mixed samplers, CFG on and off.
MIX = [
    ("euler_a", 12, 7.5, 64),
    ("dpmpp_2m_karras", 7, 7.5, 64),
    ("ddim", 9, 1.0, 64),
    ("heun", 5, 5.0, 64),
    ("unipc", 6, 7.5, 128),
    ("euler", 10, 7.5, 64),
]


def generate(client, i, sampler, steps, guidance, size, started: threading.Event | None = None):
    for event in client.generate(
        f"a shape number {i}", seed=100 + i, sampler=sampler, num_steps=steps, guidance_scale=guidance, width=size, height=size
    ):
        if isinstance(event, Progress) and started is not None:
            started.set()
        if isinstance(event, Image):
            return pixels(event.data)
    raise AssertionError("no image")


def test_batched_images_equal_solo_images():
    with running_server(max_batch_size=8) as server, ImpastoClient(server.target) as client:
        solo = [generate(client, i, *m) for i, m in enumerate(MIX)]

        stats = server.engine.step_loop.stats
        before_batches, before_images, before_mixed = stats.batches, stats.batched_images, stats.mixed_step_batches
        results: dict[int, np.ndarray] = {}
        threads = []
        previous_started = None
        for i, m in enumerate(MIX):
            started = threading.Event()

            def work(i=i, m=m, started=started):
                results[i] = generate(client, i, *m, started=started)

            t = threading.Thread(target=work)
            t.start()
            threads.append(t)
            # Stagger: the next request joins while this one is mid-way, at another step index.
            started.wait(30)
            previous_started = started
        for t in threads:
            t.join(120)
        assert previous_started.is_set()

        batches = stats.batches - before_batches
        assert (stats.batched_images - before_images) > batches, "requests never shared a UNet call"
        assert stats.mixed_step_batches > before_mixed, "no call joined requests at different steps"
        for i in range(len(MIX)):
            assert psnr(results[i], solo[i]) >= 45, f"request {i} {MIX[i]}"


def test_metrics_endpoint_exposes_the_scheduler(tmp_path):
    with running_server(metrics_port=0) as server, ImpastoClient(server.target) as client:
        list(client.generate("a red circle", num_steps=3, seed=1))
        list(client.generate("a red circle", num_steps=3, seed=2))  # same prompt: cache hit
        stream = client.generate("a blue square", num_steps=100, seed=3)
        next(stream)
        stream.close()
        from test_cancellation import wait_idle

        assert wait_idle(server.engine)
        text = urllib.request.urlopen(f"http://127.0.0.1:{server.server.metrics_port}/metrics", timeout=10).read().decode()
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            values[name] = float(value)
    assert values["impasto_images_total"] == 2
    assert values["impasto_cancellations_total"] == 1
    assert values["impasto_text_embedding_cache_hits_total"] >= 2
    assert values["impasto_batch_size_count"] >= 6
    assert values["impasto_unet_step_seconds_count"] >= 6
    assert values["impasto_time_to_first_progress_seconds_count"] >= 2
    assert values["impasto_queue_length"] == 0
    assert 'impasto_requests_total{outcome="ok"}' in values
    assert any(name.startswith("impasto_torch_fallbacks") for name in text.split())
