"""LoRA adapters end to end over gRPC: uploaded, applied by refit, compared with diffusers.

The files are made by peft and diffusers on the default model (adapter_files.py). The reference
is diffusers' pipeline with `load_lora_weights` + `set_adapters` at the same weights and seed,
with the same noise scheduler (as in test_parity_diffusers.py).
"""

from __future__ import annotations

import threading

import pytest
import torch
from adapter_files import pixels, psnr, write_diffusers, write_kohya
from conftest import serving_adapters
from image_checks import diffusers_reference

from impasto.core.samplers import SAMPLERS, make_noise_scheduler
from impasto.lora import addnet_hash
from impasto.models import default_model_path
from impasto_client import Image, ImpastoClient, InvalidArgumentError

PROMPT = "a red circle on a white background"
NEGATIVE = "a blue square"
SETTINGS = dict(negative_prompt=NEGATIVE, sampler="euler", seed=1234, num_steps=6, guidance_scale=7.5)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora_files")
    return {
        # UNet + text encoder, kohya (diffusers' converter); UNet only, diffusers format.
        "a": write_kohya(root / "a.safetensors", seed=1, text_encoder=True),
        "b": write_diffusers(root / "b", seed=2),
    }


@pytest.fixture(scope="module")
def served(tmp_path_factory, files):
    uploads = [(files["a"], "style-a", None), (str(files["b"]), "style-b", "diffusers")]
    with serving_adapters(uploads, adapters_dir=tmp_path_factory.mktemp("adapters")) as served:
        yield served


@pytest.fixture(scope="module")
def pipe():
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(default_model_path(), safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def image(client, prompt=PROMPT, **options) -> tuple:
    event = next(e for e in client.generate(prompt, **{**SETTINGS, **options}) if isinstance(e, Image))
    return pixels(event.data), event.infotext


def diffusers_image(pipe, files, weights: dict[str, float], callback=None):
    pipe.unload_lora_weights()
    for name, w in weights.items():
        pipe.load_lora_weights(str(files[name]), adapter_name=name)
    if weights:
        pipe.set_adapters(list(weights), adapter_weights=list(weights.values()))
    out = diffusers_reference(
        pipe, PROMPT, NEGATIVE, sampler=SETTINGS["sampler"], seed=SETTINGS["seed"], num_steps=SETTINGS["num_steps"],
        guidance_scale=SETTINGS["guidance_scale"], callback=callback,
    )
    pipe.unload_lora_weights()
    return out


@pytest.mark.parametrize("weights", [{"a": 0.8}, {"b": 1.0}, {"a": 0.5, "b": 0.7}], ids=["a-unet+te", "b-unet", "a+b"])
def test_matches_diffusers_load_lora_weights(served, pipe, files, weights):
    _, client = served
    ours, _ = image(client, adapters=[(f"style-{n}", w) for n, w in weights.items()])
    reference = diffusers_image(pipe, files, weights)
    base = diffusers_image(pipe, files, {})
    assert psnr(reference, base) < 30, "the adapter must change the image for this test to mean anything"
    assert psnr(ours, reference) >= 40
    if "a" in weights:  # style-a carries text-encoder LoRA too: it went through the encoder's refit
        engine = served[0].engine
        model = engine.registry.load("")
        assert engine.step_loop.adapters_of(model).text_encoder.num_switches >= 1


def test_switching_is_exact_a_b_a_and_back_to_base(served):
    server, client = served
    base, _ = image(client)
    a1, _ = image(client, adapters=[("style-a", 0.8)])
    b, _ = image(client, adapters=[("style-b", 1.0)])
    a2, _ = image(client, adapters=[("style-a", 0.8)])
    base2, _ = image(client)
    assert (a1 == a2).all(), "A -> B -> A must give A's image bit for bit"
    assert (base == base2).all(), "no adapters must give the base image bit for bit"
    assert psnr(a1, b) < 30 and psnr(a1, base) < 30
    assert server.engine.step_loop.stats.adapter_switches >= 4
    switches = server.engine.metrics.registry.get_sample_value("impasto_adapter_switch_seconds_count", {"component": "unet"})
    assert switches is not None and switches >= 4


def test_prompt_syntax_strips_tag_and_writes_lora_hashes(served, files):
    _, client = served
    via_field, _ = image(client, adapters=[("style-a", 0.8)])
    via_tag, infotext = image(client, prompt=f"{PROMPT} <lora:style-a:0.8>")
    assert (via_field == via_tag).all()
    assert infotext.startswith(f"{PROMPT} <lora:style-a:0.8>\n")  # A1111 keeps the tag in the infotext
    assert f'Lora hashes: "style-a: {addnet_hash(files["a"])[:12]}"' in infotext
    default_weight, _ = image(client, prompt=f"<lora:style-b> {PROMPT}")
    explicit, _ = image(client, adapters=[("style-b", 1.0)])
    assert (default_weight == explicit).all()


def test_unknown_adapter_is_refused_by_name(served):
    _, client = served
    with pytest.raises(InvalidArgumentError, match="adapters\\[0\\].adapter: unknown adapter 'nope'"):
        list(client.generate(PROMPT, adapters=[("nope", 1.0)]))
    with pytest.raises(InvalidArgumentError, match="prompt: unknown adapter 'missing'"):
        list(client.generate(f"{PROMPT} <lora:missing:0.5>"))
    with pytest.raises(InvalidArgumentError, match="weight_schedule"):
        list(client.generate(PROMPT, adapters=[("style-a", "1@2")]))


def test_concurrent_requests_with_different_adapters_are_each_correct(served):
    server, client = served
    solo = {name: image(client, adapters=[(name, 0.9)], seed=77)[0] for name in ("style-a", "style-b")}
    results: dict[str, object] = {}

    def run(name):
        with ImpastoClient(server.target) as c:
            results[name] = image(c, adapters=[(name, 0.9)], seed=77)[0]

    threads = [threading.Thread(target=run, args=(n,)) for n in solo for _ in range(1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    for name in solo:
        assert (results[name] == solo[name]).all(), name


def test_weight_schedule_matches_diffusers_with_per_step_weights(served, pipe, files):
    _, client = served
    schedule = "0@0,1@0.5"
    ours, _ = image(client, adapters=[("style-b", schedule)])
    steps = SETTINGS["num_steps"]

    def weight(fraction):  # the same curve: linear from 0 at 0 to 1 at 0.5, then held
        return min(1.0, fraction / 0.5)

    def per_step(pipeline, i, t, kwargs):
        pipeline.set_adapters(["b"], adapter_weights=[weight((i + 1) / steps)])
        return kwargs

    pipe.unload_lora_weights()
    pipe.load_lora_weights(str(files["b"]), adapter_name="b")
    pipe.set_adapters(["b"], adapter_weights=[weight(0.0)])
    pipe.scheduler = make_noise_scheduler(SAMPLERS[SETTINGS["sampler"]], dict(pipe.scheduler.config), SETTINGS["seed"])
    reference = pipe(
        PROMPT,
        negative_prompt=NEGATIVE,
        num_inference_steps=steps,
        guidance_scale=SETTINGS["guidance_scale"],
        generator=torch.Generator("cpu").manual_seed(SETTINGS["seed"]),
        output_type="np",
        callback_on_step_end=per_step,
    ).images[0]
    pipe.unload_lora_weights()
    reference = (reference * 255).round().astype("uint8")
    assert psnr(ours, reference) >= 40
    constant, _ = image(client, adapters=[("style-b", 1.0)])
    assert psnr(ours, constant) < 40  # the schedule did change something
