"""Textual-inversion embeddings end to end over gRPC: uploaded, written in prompts, compared with
diffusers' `load_textual_inversion`.

The vectors are rows of the default model's own token table ("blue", "square"), so a token that
stands for them must give exactly the image of the words: a check that needs no reference image.
The diffusers reference loads the same file with `load_textual_inversion(file, token=...)`, with
the seed and noise scheduler matched as in test_parity_diffusers.py.
"""

from __future__ import annotations

import pytest
import torch
from adapter_files import pixels, psnr
from conftest import serving_adapters
from image_checks import diffusers_reference
from safetensors.torch import save_file

from impasto.models import default_model_path
from impasto_client import Image, InvalidArgumentError
from impasto_client.pb import adapter_service_pb2 as apb

SETTINGS = dict(sampler="euler", seed=1234, num_steps=6, guidance_scale=7.5)
TOKEN = "<shape-x>"


def token_rows(words: str) -> torch.Tensor:
    """The default model's token-table rows of `words` (one per CLIP token)."""
    from transformers import CLIPTextModel, CLIPTokenizer

    root = default_model_path()
    tokenizer = CLIPTokenizer.from_pretrained(root / "tokenizer")
    table = CLIPTextModel.from_pretrained(root / "text_encoder").get_input_embeddings().weight.detach()
    return table[tokenizer(words, add_special_tokens=False).input_ids].clone()


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("embedding_files")
    # diffusers' textual-inversion example saves `{placeholder_token: vectors}` with safetensors.
    save_file({TOKEN: token_rows("blue square")}, str(root / "learned_embeds.safetensors"))
    # kohya-ss / A1111: `emb_params`, the token is the file's (here: the upload's) name.
    save_file({"emb_params": token_rows("red circle")}, str(root / "redthing.safetensors"))
    save_file({"<other>": token_rows("green")}, str(root / "other.safetensors"))
    save_file({TOKEN: token_rows("green")}, str(root / "same-token.safetensors"))
    save_file({"<wide>": torch.randn(2, 768)}, str(root / "wide.safetensors"))  # made for SD 1.x
    return root


@pytest.fixture(scope="module")
def served(tmp_path_factory, files):
    # Embeddings named by the request only: by-name use (A1111's) is test_embeddings_by_name.py.
    uploads = [
        (files / "learned_embeds.safetensors", "shape-x", None), (files / "redthing.safetensors", "redthing", "embedding"),
        (files / "other.safetensors", "other", None), (files / "same-token.safetensors", "same-token", None),
    ]  # fmt: skip
    with serving_adapters(uploads, adapters_dir=tmp_path_factory.mktemp("adapters"), apply_embeddings_named_in_prompt=False) as served:
        yield served


def image(client, prompt: str, **options):
    return pixels(next(e for e in client.generate(prompt, **{**SETTINGS, **options}) if isinstance(e, Image)).data)


def test_matches_diffusers_load_textual_inversion(served, files):
    from diffusers import StableDiffusionPipeline

    _, client = served
    prompt, negative = f"a {TOKEN} on a white background", "a red circle"
    ours = image(client, prompt, negative_prompt=negative, adapters=[("shape-x", 1.0)])

    pipe = StableDiffusionPipeline.from_pretrained(default_model_path(), safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_textual_inversion(str(files / "learned_embeds.safetensors"), token=TOKEN)
    reference = diffusers_reference(
        pipe, prompt, negative, sampler=SETTINGS["sampler"], seed=SETTINGS["seed"], num_steps=SETTINGS["num_steps"],
        guidance_scale=SETTINGS["guidance_scale"],
    )
    assert psnr(ours, reference) >= 40
    without = image(client, prompt, negative_prompt=negative)  # the token is just characters then
    assert psnr(ours, without) < 30, "the embedding must change the image for this test to mean anything"


def test_a_token_is_its_vectors_two_positions_for_two_vectors(served):
    _, client = served
    words = image(client, "a blue square on a white background")
    assert (image(client, f"a {TOKEN} on a white background", adapters=[("shape-x", 1.0)]) == words).all()
    # As a prompt tag; the weight scales LoRA deltas only, so even 0 keeps the token's meaning.
    assert (image(client, f"a {TOKEN} on a white background <lora:shape-x:0>") == words).all()
    # The negative prompt takes the request's tokens too.
    negative_words = image(client, "a red circle", negative_prompt="blue square")
    assert (image(client, "a red circle", negative_prompt=TOKEN, adapters=[("shape-x", 1.0)]) == negative_words).all()


def test_a1111_embedding_is_named_after_the_upload(served):
    _, client = served
    listed = {a.name: a for a in client.list_adapters()}
    red = listed["redthing"]
    assert red.format == apb.ADAPTER_FORMAT_EMBEDDING and red.has_embeddings and red.num_targets == 0
    assert [(t.token, t.num_vectors) for t in red.tokens] == [("redthing", 2)]
    assert [(t.token, t.num_vectors) for t in listed["shape-x"].tokens] == [(TOKEN, 2)]
    words = image(client, "a red circle on a white background")
    assert (image(client, "a RedThing on a white background", adapters=[("redthing", 1.0)]) == words).all()


def test_tokens_of_adapters_outside_the_request_are_just_words(served):
    _, client = served
    plain = image(client, "a red circle on a white background")
    # An adapter in the set whose token the prompt does not write changes nothing.
    assert (image(client, "a red circle on a white background", adapters=[("shape-x", 1.0)]) == plain).all()
    # A token whose adapter is not in the set tokenizes as text, like any unknown word.
    a = image(client, f"a {TOKEN} on a white background")
    b = image(client, f"a {TOKEN} on a white background", adapters=[("other", 1.0)])
    assert (a == b).all()
    assert psnr(a, image(client, f"a {TOKEN} on a white background", adapters=[("shape-x", 1.0)])) < 30


def test_one_token_from_two_adapters_in_one_request_is_refused(served):
    _, client = served
    with pytest.raises(InvalidArgumentError, match=r"adapters: adapters 'shape-x' and 'same-token' both define the embedding token '<shape-x>'"):
        list(client.generate(f"a {TOKEN}", adapters=[("shape-x", 1.0), ("same-token", 1.0)]))


def test_wrong_width_is_refused_and_the_server_keeps_serving(served, files):
    _, client = served
    with pytest.raises(InvalidArgumentError, match=r"data: .*'<wide>' has vectors of width 768, but the base model's text_encoder hidden size is 32"):
        client.upload_adapter(files / "wide.safetensors", "wide")
    assert "wide" not in [a.name for a in client.list_adapters()]
    assert image(client, "a red circle").shape[-1] == 3
