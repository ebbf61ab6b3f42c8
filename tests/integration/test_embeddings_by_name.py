"""A1111's embeddings by name, and `TI hashes`, over gRPC.

An uploaded adapter that is embeddings alone applies wherever a prompt writes its token, as an
embedding in A1111's embeddings folder does: the image is the one of the request that names it.
LoRAs (with bundled embeddings or not) never apply by name. The infotext lists the embeddings a
prompt used under `TI hashes` with A1111's hash of an embedding (sha256 of the whole file), and
LoRAs under `Lora hashes` (addnet hash).

The vectors are rows of the default model's token table, so a token that stands for "red circle"
must give exactly the image of those words.
"""

from __future__ import annotations

import hashlib

import pytest
from adapter_files import cloneofsimo_lora, pixels, psnr, save_cloneofsimo
from conftest import running_server, serving_adapters
from safetensors.torch import save_file
from test_embeddings_generate import token_rows

from impasto.lora import addnet_hash
from impasto_client import Image, ImpastoClient, InvalidArgumentError

SETTINGS = dict(sampler="euler", seed=99, num_steps=6, guidance_scale=7.5)
ON_WHITE = "on a white background"


def sha256_short(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:12]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("by_name_files")

    def save(name, tensors, metadata=None):
        save_file(tensors, str(root / name), metadata=metadata)
        return root / name

    unet_sd, te_sd, order = cloneofsimo_lora(seed=3)
    return {
        # kohya / A1111: the token is the name it is uploaded under.
        "redthing": save("redthing.safetensors", {"emb_params": token_rows("red circle")}),
        "bluething": save("bluething.safetensors", {"emb_params": token_rows("blue square")}),
        # diffusers: the key is the token.
        "shape-x": save("learned_embeds.safetensors", {"<shape-x>": token_rows("blue square")}),
        "same-token": save("same.safetensors", {"<shape-x>": token_rows("green")}),
        # A LoRA with a bundled token (pivotal tuning).
        "pivotal": save_cloneofsimo(root / "pivotal.safetensors", {"unet": unet_sd, "text_encoder": te_sd}, order, {"<s1>": token_rows("green")[0]}),
    }


@pytest.fixture(scope="module")
def adapters_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("adapters")


@pytest.fixture(scope="module")
def served(adapters_dir, files):
    with serving_adapters([(files["redthing"], "redthing", "embedding"), (files["shape-x"], "shape-x", None)], adapters_dir=adapters_dir) as served:
        yield served


def generate(client, prompt: str, **options):
    event = next(e for e in client.generate(prompt, **{**SETTINGS, **options}) if isinstance(e, Image))
    return pixels(event.data), event.infotext


def image(client, prompt: str, **options):
    return generate(client, prompt, **options)[0]


def test_a_token_in_the_prompt_applies_its_embedding(served, files):
    _, client = served
    words = image(client, f"a red circle {ON_WHITE}")
    by_name, infotext = generate(client, f"a RedThing {ON_WHITE}")
    named, named_infotext = generate(client, f"a redthing {ON_WHITE}", adapters=[("redthing", 1.0)])
    assert (by_name == words).all() and (named == words).all()
    ti_hashes = f'TI hashes: "redthing: {sha256_short(files["redthing"])}"'
    assert ti_hashes in infotext and ti_hashes in named_infotext
    assert "Lora hashes" not in infotext and "Lora hashes" not in named_infotext
    # A whole word only, as A1111 matches token ids: "redthings" is just text.
    assert "TI hashes" not in generate(client, f"a redthings {ON_WHITE}")[1]
    # Named but not written: it changed nothing, and A1111 lists only embeddings a prompt used.
    assert "TI hashes" not in generate(client, f"a red circle {ON_WHITE}", adapters=[("redthing", 1.0)])[1]


def test_the_negative_prompt_applies_them_too(served, files):
    _, client = served
    words = image(client, f"a red circle {ON_WHITE}", negative_prompt="blue square")
    by_name, infotext = generate(client, f"a red circle {ON_WHITE}", negative_prompt="<shape-x>")
    assert (by_name == words).all()
    assert f'TI hashes: "shape-x: {sha256_short(files["shape-x"])}"' in infotext
    both = generate(client, f"a redthing {ON_WHITE}", negative_prompt="<SHAPE-X>")[1]
    assert f'TI hashes: "redthing: {sha256_short(files["redthing"])}, shape-x: {sha256_short(files["shape-x"])}"' in both


def test_loras_are_never_applied_by_name_and_stay_under_lora_hashes(served, files):
    _, client = served
    prompt = f"a <s1> circle {ON_WHITE}"
    before = image(client, prompt)
    client.upload_adapter(files["pivotal"], "pivotal")
    try:
        after, infotext = generate(client, prompt)
        assert (after == before).all() and "hashes" not in infotext
        named, named_infotext = generate(client, prompt, adapters=[("pivotal", 1.0)])
        assert psnr(named, before) < 30
        assert f'Lora hashes: "pivotal: {addnet_hash(files["pivotal"])[:12]}"' in named_infotext
        assert "TI hashes" not in named_infotext  # its bundled token is the LoRA's
        both = generate(client, f"{prompt}, redthing", adapters=[("pivotal", 1.0)])[1]
        assert "Lora hashes: \"pivotal: " in both and f'TI hashes: "redthing: {sha256_short(files["redthing"])}"' in both
    finally:
        client.delete_adapter("pivotal")


def test_deleting_the_adapter_makes_the_token_words_again(served, files):
    _, client = served
    prompt = f"a bluething {ON_WHITE}"
    plain = image(client, prompt)
    client.upload_adapter(files["bluething"], "bluething")
    applied = image(client, prompt)
    assert (applied == image(client, f"a blue square {ON_WHITE}")).all()
    assert psnr(applied, plain) < 30, "the embedding must change the image for this test to mean anything"
    client.delete_adapter("bluething")
    assert (image(client, prompt) == plain).all()


def test_one_token_of_two_embeddings_must_be_named(served, files):
    _, client = served
    client.upload_adapter(files["same-token"], "same-token")
    try:
        for field, options in (("prompt", {}), ("negative_prompt", {"negative_prompt": "<shape-x>"})):
            prompt = f"a <shape-x> {ON_WHITE}" if field == "prompt" else f"a red circle {ON_WHITE}"
            with pytest.raises(InvalidArgumentError, match=rf"{field}: the embedding token '<shape-x>' belongs to adapters 'same-token' and 'shape-x'; name the one meant"):
                list(client.generate(prompt, **{**SETTINGS, **options}))
        named = image(client, f"a <shape-x> {ON_WHITE}", adapters=[("same-token", 1.0)])
        assert (named == image(client, f"a green {ON_WHITE}")).all()
    finally:
        client.delete_adapter("same-token")


def test_the_server_option_turns_it_off(adapters_dir, served):
    _, client = served
    applied = image(client, f"a redthing {ON_WHITE}")
    with running_server(adapters_dir=adapters_dir, apply_embeddings_named_in_prompt=False) as off, ImpastoClient(off.target) as off_client:
        words, infotext = generate(off_client, f"a redthing {ON_WHITE}")
        assert psnr(words, applied) < 30 and "TI hashes" not in infotext
        assert (image(off_client, f"a redthing {ON_WHITE}", adapters=[("redthing", 1.0)]) == applied).all()
