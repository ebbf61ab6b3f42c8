"""The asyncio client, and the `impasto` CLI as a user runs it (a real `impasto serve` process)."""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys
import threading

import pytest
from PIL import Image as PILImage

from impasto_client import AsyncImpastoClient, Done, Image, InvalidArgumentError, Progress, Started


def test_async_client_streams_typed_events_and_raises_typed_errors(server):
    async def main():
        async with AsyncImpastoClient(server.target) as client:
            events = [e async for e in client.generate("a red circle", seed=4, num_steps=3, num_images=2)]
            models = await client.list_models()
            samplers = await client.list_samplers()
            info = await client.server_info()
            with pytest.raises(InvalidArgumentError, match="num_steps"):
                async for _ in client.generate("a red circle", num_steps=0):
                    pass
            # leaving the loop early cancels the request on the server
            async for event in client.generate("a red circle", seed=5, num_steps=100):
                if isinstance(event, Progress):
                    break
            return events, models, samplers, info

    events, models, samplers, info = asyncio.run(main())
    assert isinstance(events[0], Started) and isinstance(events[-1], Done)
    assert [e.seed for e in events if isinstance(e, Image)] == [4, 5]
    assert models and samplers and info.version


@pytest.fixture(scope="module")
def cli_server():
    proc = subprocess.Popen(
        [sys.executable, "-m", "impasto.cli", "serve", "--port", "0", "--threads", "1"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    target = None
    for line in proc.stdout:
        match = re.match(r"impasto: serving on (\S+)", line)
        if match:
            target = match.group(1)
            break
    assert target, f"server did not start (exit {proc.poll()})"
    threading.Thread(target=proc.stdout.read, daemon=True).start()
    yield target
    proc.terminate()
    assert proc.wait(30) == 0  # SIGTERM stops it cleanly


def impasto(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "impasto.cli", *args], capture_output=True, text=True, timeout=300)


def test_cli_generates_with_progress_previews_and_a_png(cli_server, tmp_path):
    out = tmp_path / "cat.png"
    result = impasto(
        "generate", "a blue square", "--target", cli_server, "-o", str(out), "--seed", "7", "--steps", "6",
        "--sampler", "dpmpp_2m", "--preview-every", "2", "--preview-dir", str(tmp_path / "previews"),
    )
    assert result.returncode == 0, result.stderr
    assert "6/6" in result.stderr and "seed 7" in result.stderr
    image = PILImage.open(out)
    assert image.size == (64, 64) and "Seed: 7" in image.info["parameters"]
    assert sorted(p.name for p in (tmp_path / "previews").iterdir()) == ["preview_0002.jpg", "preview_0004.jpg"]


def test_cli_lists_models_and_reports_bad_input(cli_server, tmp_path):
    models = impasto("models", "--target", cli_server)
    assert models.returncode == 0 and "[default]" in models.stdout
    bad = impasto("generate", "x", "--target", cli_server, "--size", "60x64", "-o", str(tmp_path / "x.png"))
    assert bad.returncode == 2 and "INVALID_ARGUMENT: width" in bad.stderr
    assert not (tmp_path / "x.png").exists()
