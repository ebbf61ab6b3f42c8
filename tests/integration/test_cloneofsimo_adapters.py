"""cloneofsimo/lora files uploaded to a real server: placed by the served model's module order.

A cloneofsimo file names no layer: `unet:{i}:up` is the i-th module cloneofsimo's injector wraps
(adapter_files.py). The server places the indices with the module trees of the model it serves
(server/core/model_layout.py). The file here holds a peft LoRA's matrices and a pivotal-tuning
token `<s1>`; the same LoRA in diffusers form plus the same vector as a diffusers embedding file
must give the same image, bit for bit: the canonical form is the same, so is the arithmetic.
"""

from __future__ import annotations

import pytest
from adapter_files import cloneofsimo_lora, pixels, psnr, save_cloneofsimo, save_diffusers
from conftest import running_server, serving_adapters
from safetensors.torch import save_file
from test_embeddings_generate import token_rows

from impasto_client import AlreadyExistsError, Image, ImpastoClient, InvalidArgumentError
from impasto_client.pb import adapter_service_pb2 as apb

PROMPT = "a <s1> circle on a white background"
SETTINGS = dict(negative_prompt="a red square", sampler="euler", seed=4321, num_steps=6, guidance_scale=7.5)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("cloneofsimo_files")
    unet_sd, te_sd, order = cloneofsimo_lora(seed=7)
    vector = token_rows("blue")[0]  # cloneofsimo saves one vector per token, 1-D
    return {
        "pivotal": save_cloneofsimo(root / "pivotal.safetensors", {"unet": unet_sd, "text_encoder": te_sd}, order, {"<s1>": vector}),
        "lora-only": save_cloneofsimo(root / "lora.safetensors", {"unet": unet_sd, "text_encoder": te_sd}, order),
        "diffusers": save_diffusers(root / "diffusers", unet_sd, te_sd),
        "s1": _save(root / "learned_embeds.safetensors", {"<s1>": vector}),
        # One UNet module short: made for a model with another module count.
        "short": save_cloneofsimo(root / "short.safetensors", {"unet": unet_sd}, {"unet": order["unet"][:-1]}),
        "num_unet": len(order["unet"]),
        "num_targets": len(order["unet"]) + len(order["text_encoder"]),
    }


def _save(path, tensors):
    save_file(tensors, str(path))
    return path


@pytest.fixture(scope="module")
def adapters_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("adapters")


@pytest.fixture(scope="module")
def served(adapters_dir, files):
    uploads = [(files["pivotal"], "pivotal", None), (files["diffusers"], "lora-d", "diffusers"), (files["s1"], "s1", None)]
    with serving_adapters(uploads, adapters_dir=adapters_dir) as served:
        yield served


def image(client, prompt=PROMPT, **options):
    event = next(e for e in client.generate(prompt, **{**SETTINGS, **options}) if isinstance(e, Image))
    return pixels(event.data)


def test_upload_places_every_index(served, files):
    _, client = served
    info = {a.name: a for a in client.list_adapters()}["pivotal"]
    assert info.format == apb.ADAPTER_FORMAT_CLONEOFSIMO
    assert info.num_targets == files["num_targets"]
    assert [(t.token, t.num_vectors) for t in info.tokens] == [("<s1>", 1)]


def test_same_image_as_the_lora_in_diffusers_form(served):
    _, client = served
    clone = image(client, adapters=[("pivotal", 0.8)])
    reference = image(client, adapters=[("lora-d", 0.8), ("s1", 1.0)])
    assert psnr(clone, image(client, prompt="a blue circle on a white background")) < 30, "the LoRA must change the image"
    assert (clone == reference).all()


def test_the_lora_alone_is_the_diffusers_adapter(served, files):
    """Same canonical content, so the same adapter id: stored once, refused under a second name."""
    _, client = served
    with pytest.raises(AlreadyExistsError, match="already stored as 'lora-d'"):
        client.upload_adapter(files["lora-only"], "clone-lora")


def test_module_count_mismatch_is_refused_naming_the_file(served, files):
    _, client = served
    n = files["num_unet"]
    with pytest.raises(InvalidArgumentError, match=rf"data: upload 'short': 'unet' has {n - 1} modules but the base model has {n} "):
        client.upload_adapter(files["short"], "short")
    assert "short" not in [a.name for a in client.list_adapters()]


def test_a_restart_parses_the_stored_file_again(served, adapters_dir):
    _, client = served
    before = image(client, adapters=[("pivotal", 0.8)])
    with running_server(adapters_dir=adapters_dir) as again, ImpastoClient(again.target) as fresh:
        assert (image(fresh, adapters=[("pivotal", 0.8)]) == before).all()
