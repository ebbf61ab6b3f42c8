"""The server on compiled engines: `impasto compile` output loaded by preference, images equal
to the torch backend's, torch fallback (counted) for shapes no engine fits, and engine folders
that do not match the model refused whole."""

from __future__ import annotations

import io
import json
import shutil

import numpy as np
import pytest
from PIL import Image as PILImage

from image_checks import psnr
from impasto.backends.availability import backend_status
from impasto.compiler.build import BuildRequest, compile_model
from impasto.models import default_model_path
from impasto_client import Image, ImpastoClient

from conftest import running_server

pytestmark = pytest.mark.skipif(not backend_status("openvino").available, reason=backend_status("openvino").reason)


@pytest.fixture(scope="module")
def engines_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("engines")
    built = compile_model(BuildRequest(default_model_path(), "openvino", out), log=lambda *a: None)
    # A copy built (it says) with another OpenVINO version: refused whole, not half-used.
    stale = out / "stale-copy"
    shutil.copytree(built.folder, stale)
    manifest = json.loads((stale / "manifest.json").read_text())
    manifest["backend_version"] = "0.0.1-other"
    (stale / "manifest.json").write_text(json.dumps(manifest))
    return out


def image_of(client, **options) -> np.ndarray:
    event = next(e for e in client.generate(options.pop("prompt", "a red circle on a white background"), **options) if isinstance(e, Image))
    return np.asarray(PILImage.open(io.BytesIO(event.data)).convert("RGB"))




def test_compiled_engines_serve_the_torch_image(server, engines_dir):
    with ImpastoClient(server.target) as torch_client:
        reference = image_of(torch_client, seed=5, num_steps=8, sampler="dpmpp_2m_karras")
    with running_server(backends=("openvino", "torch"), engines_dir=engines_dir) as compiled, ImpastoClient(compiled.target) as client:
        info = client.server_info()
        unets = [e.backend for e in info.engines if e.component == "unet"]
        assert unets == ["openvino", "torch"]  # preference order, torch last as the fallback
        ours = image_of(client, seed=5, num_steps=8, sampler="dpmpp_2m_karras")
        assert psnr(ours, reference) >= 40
        model = compiled.engine.registry.load("")
        assert model.engines.unet.last_backend == "openvino"
        report = compiled.engine.registry.engine_reports[model.entry.name]
        assert [b for b, _ in report.loaded] == ["openvino"]
        assert any("stale-copy" in str(folder) and "installed is" in reason for folder, reason in report.refused)

        fallbacks = compiled.engine.metrics.torch_fallbacks
        image_of(client, seed=5, num_steps=2, width=128, height=128)  # outside the engine's profile
        assert model.engines.unet.last_backend == "torch"
        assert fallbacks.labels("no_profile")._value.get() >= 1
        image_of(client, prompt=", ".join(["a red circle"] * 30), seed=5, num_steps=2)  # two 77-token chunks
        assert fallbacks.labels("context_length")._value.get() >= 1
        assert model.engines.unet.last_backend == "torch"


def test_adapters_refit_into_compiled_engines(engines_dir, tmp_path):
    """LoRA on compiled engines: each refit image equals the torch backend's with the same
    adapters, and switching A -> B -> A -> none is exact on the compiled engine too."""
    from adapter_files import write_diffusers, write_kohya

    a = write_kohya(tmp_path / "a.safetensors", seed=1, text_encoder=True)
    b = write_diffusers(tmp_path / "b", seed=2)
    settings = dict(seed=21, num_steps=6, sampler="euler")

    def serve_and_generate(**config):
        with running_server(adapters_dir=tmp_path / f"adapters-{len(config)}", **config) as s, ImpastoClient(s.target) as client:
            client.upload_adapter(a, "style-a")
            client.upload_adapter(str(b), "style-b", format="diffusers")
            images = [
                image_of(client, **settings),
                image_of(client, adapters=[("style-a", 0.8)], **settings),
                image_of(client, adapters=[("style-b", 1.0)], **settings),
                image_of(client, adapters=[("style-a", 0.8)], **settings),
                image_of(client, **settings),
            ]
            backend = s.engine.registry.load("").engines.unet.last_backend
        return images, backend

    compiled, backend = serve_and_generate(backends=("openvino", "torch"), engines_dir=engines_dir)
    assert backend == "openvino"
    reference, _ = serve_and_generate()
    for ours, theirs in zip(compiled, reference):
        assert psnr(ours, theirs) >= 40
    base, with_a, _, with_a_again, base_again = compiled
    assert np.array_equal(with_a, with_a_again)  # A -> B -> A gives A, bit for bit
    assert np.array_equal(base, base_again)  # and removing all adapters gives the base
    assert psnr(with_a, base) < 40  # the adapter did change the image


def test_embedding_chunks_run_on_the_torch_text_encoder(engines_dir, tmp_path):
    """Compiled text encoders take token ids only: a chunk with textual-inversion vectors runs on
    torch (counted, reason "embeddings") and gives the torch server's image, while plain prompts
    stay on the compiled engine."""
    import torch
    from safetensors.torch import save_file

    save_file({"<cmp-x>": torch.randn(2, 32, generator=torch.Generator().manual_seed(0)) * 0.03}, str(tmp_path / "x.safetensors"))
    settings = dict(seed=8, num_steps=4, sampler="euler", negative_prompt="a blue square")

    def serve(**config):
        with running_server(adapters_dir=tmp_path / f"adapters-{len(config)}", **config) as s, ImpastoClient(s.target) as client:
            client.upload_adapter(tmp_path / "x.safetensors", "cmp-x")
            model = s.engine.registry.load("")
            image_of(client, prompt="a red circle on a gray background", **settings)
            plain_backend = model.engines.text_encoder.last_backend
            ours = image_of(client, prompt="a <cmp-x> on a white background", adapters=[("cmp-x", 1.0)], **settings)
            return ours, plain_backend, model.engines.text_encoder.last_backend, s.engine.metrics.torch_fallbacks.labels("embeddings")._value.get()

    reference, _, _, _ = serve()
    ours, plain_backend, backend, fallbacks = serve(backends=("openvino", "torch"), engines_dir=engines_dir)
    assert plain_backend == "openvino" and backend == "torch" and fallbacks == 1
    assert psnr(ours, reference) >= 40


def test_weight_schedule_runs_where_a_refit_costs_less_than_a_step(engines_dir, tmp_path):
    """A weight schedule refits the UNet before every step (engine_router.SCHEDULE_MAX_REFIT_PER_STEP).
    With OpenVINO's parameter refit (a memory copy, far shorter than a step) it runs on the compiled
    engine and gives the torch server's image. The same engine folder loaded with OpenVINO's
    recompile refit (every profile recompiled at each refit: far longer than a step) refuses it,
    once the server has measured a refit, with FAILED_PRECONDITION naming the field; constant
    weights still run there."""
    from adapter_files import write_kohya
    from impasto.backends.engine_folder import load_engine_folder
    from impasto_client import UnavailableError

    a = write_kohya(tmp_path / "a.safetensors", seed=1)
    settings = dict(seed=21, num_steps=6, sampler="euler")
    scheduled = dict(adapters=[("style-a", "0@0,1@0.5")], **settings)
    with running_server(adapters_dir=tmp_path / "adapters-torch") as s, ImpastoClient(s.target) as client:
        client.upload_adapter(a, "style-a")
        reference = image_of(client, **scheduled)

    with running_server(backends=("openvino", "torch"), engines_dir=engines_dir, adapters_dir=tmp_path / "adapters-ov") as s, ImpastoClient(s.target) as client:
        client.upload_adapter(a, "style-a")
        model = s.engine.registry.load("")
        router = model.engines.unet
        image_of(client, adapters=[("style-a", 0.8)], **settings)  # the server has measured a refit and steps
        ours = image_of(client, **scheduled)
        assert router.last_backend == "openvino"
        assert psnr(ours, reference) >= 40

        folder = next(f for backend, f in s.engine.registry.engine_reports[model.entry.name].loaded if backend == "openvino")
        router.compiled[0] = load_engine_folder(folder, model.entry.path, refit_mode="recompile").unet
        image_of(client, adapters=[("style-a", 0.8)], **settings)  # a refit that recompiles, measured
        assert router.last_backend == "openvino"
        with pytest.raises(UnavailableError, match=r"FAILED_PRECONDITION: adapters\[0\]\.weight_schedule: a weight schedule refits the UNet .* openvino engine"):
            list(client.generate("a red circle on a white background", **scheduled))
        with pytest.raises(UnavailableError, match=r"FAILED_PRECONDITION: prompt: .*use a constant weight for 'style-a'"):
            list(client.generate("a red circle <lora:style-a:0@0,1@0.5>", **settings))
        image_of(client, adapters=[("style-a", 0.5)], **settings)
        assert router.last_backend == "openvino"
