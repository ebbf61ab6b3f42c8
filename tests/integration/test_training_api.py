"""Training over real gRPC: upload a dataset, StartTraining a tiny LoRA job, watch it, then
Generate with the adapter it registered; plus the refusals (paths, bad options)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from conftest import running_server

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "unit"))
from image_checks import pixels  # noqa: E402
from training_fixtures import write_shapes  # noqa: E402

from impasto_client import Image, ImpastoClient, InvalidArgumentError, NotFoundError  # noqa: E402
from impasto_client.training import JobStatus, TrainingProgress, TrainingSample  # noqa: E402


@pytest.fixture(autouse=True)
def single_torch_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    data = tmp_path_factory.mktemp("data")
    with running_server(data_dir=data) as server:
        with ImpastoClient(server.target) as client:
            yield server, client, data


def star_files(tmp_path) -> Path:
    return write_shapes(tmp_path / "stars", [("star", "red"), ("star", "blue"), ("star", "green")], ["a red sks shape", "a blue sks shape", "a green sks shape"])


def test_lora_job_end_to_end(served, tmp_path):
    server, client, data = served
    uploaded = client.upload_dataset("stars", star_files(tmp_path))
    assert uploaded.num_files == 6
    job_id = client.start_training(
        "lora", dataset="stars", adapter_name="tiny-star", instance_prompt="a sks shape", num_steps=6, batch_size=2,
        rank=2, seed=3, checkpoint_every=4, sample_every=6, sample_prompts=["a red sks shape"], lr_scheduler="linear",
    )
    events = list(client.watch_job(job_id, timeout=300))
    assert isinstance(events[0], JobStatus)
    progress = [e for e in events if isinstance(e, TrainingProgress)]
    assert [p.step for p in progress] == list(range(progress[0].step, 7))
    assert all(p.num_steps == 6 and p.loss == p.loss for p in progress)
    rates = [p.learning_rate for p in progress]  # linear: each step's rate below the last, 0 after the end
    assert rates[0] > 0 and all(a > b for a, b in zip(rates, rates[1:])) and rates[-1] == 0, rates
    samples = [e for e in events if isinstance(e, TrainingSample)]
    assert samples and samples[0].image.startswith(b"\x89PNG") and samples[0].prompt == "a red sks shape"
    final = events[-1]
    assert isinstance(final, JobStatus) and final.state == "succeeded", final
    assert final.adapter_id and {"kohya", "diffusers", "peft_unet"} <= set(final.outputs)

    # Registered: listed, and the very next Generate can use it.
    assert "tiny-star" in [a.name for a in client.list_adapters()]
    images = [e for e in client.generate("a red sks shape <lora:tiny-star:1>", seed=1, num_steps=4) if isinstance(e, Image)]
    assert len(images) == 1 and "tiny-star" in images[0].infotext

    name, blob = client.download_job_output(job_id, "kohya")
    assert name == "tiny-star.safetensors" and len(blob) > 100
    assert client.get_job(job_id).state == "succeeded"
    assert job_id in [j.job_id for j in client.list_jobs()]


@pytest.mark.parametrize("method", ["textual_inversion", "pivotal_tuning"])
def test_embedding_jobs_are_served_by_the_next_generate(served, tmp_path, method):
    """A trained token is registered with its adapter: the next Generate that names the adapter
    reads the token as its vectors. A textual inversion is an embedding alone, so a prompt that
    writes its token uses it by name (A1111's rule); pivotal tuning's token comes with its LoRA,
    so a request that does not name the adapter reads it as plain text."""
    _, client, _ = served
    folder = write_shapes(tmp_path / "pink", [("star", "red"), ("star", "blue")], ["a red {token} shape", "a blue {token} shape"])
    client.upload_dataset(f"{method}-stars", folder)
    name, token = f"tiny-{method.replace('_', '-')}", f"<{method[:5]}-star>"
    # Pivotal tuning in diffusers' order (LoRA beside the token): the option reaches the trainer.
    options = dict(embedding_steps=1, train_lora_with_embedding=True) if method == "pivotal_tuning" else {}
    job_id = client.start_training(
        method, dataset=f"{method}-stars", adapter_name=name, token=token, initializer_token="star",
        num_vectors=2, num_steps=2, batch_size=1, seed=5, rank=1, embedding_lr=0.5, **options,
    )  # fmt: skip
    events = list(client.watch_job(job_id, timeout=300))
    final = events[-1]
    phases = [e.phase for e in events if isinstance(e, TrainingProgress)]
    assert phases == (["embedding+lora", "lora"] if method == "pivotal_tuning" else ["embedding"] * 2), phases
    assert isinstance(final, JobStatus) and final.state == "succeeded" and final.adapter_id, final
    assert "embeddings" in final.outputs and "not registered" not in final.message

    listed = {a.name: a for a in client.list_adapters()}[name]
    assert listed.has_embeddings and [(t.token, t.num_vectors) for t in listed.tokens] == [(token, 2)]
    prompt = f"a {token} on a white background"
    trained = [e for e in client.generate(f"{prompt} <lora:{name}:1>", seed=1, num_steps=4) if isinstance(e, Image)]
    plain = [e for e in client.generate(prompt, seed=1, num_steps=4) if isinstance(e, Image)]
    assert len(trained) == 1 and name in trained[0].infotext
    by_name = method == "textual_inversion"
    assert (pixels(trained[0].data) == pixels(plain[0].data)).all() == by_name
    assert (f'TI hashes: "{name}: ' in plain[0].infotext) == by_name
    _, blob = client.download_job_output(job_id, "kohya")
    if method == "textual_inversion":  # A1111's embedding file: the vectors only, no token
        from safetensors.torch import load

        assert list(load(blob)) == ["emb_params"]


def run_pivotal_star_job(client, tmp_path, name: str, **options) -> tuple[str, list[str]]:
    """A tiny pivotal-tuning job on two star images captioned "a <colour> <name> shape", run to
    success and checked to be served: (job id, the keys of its kohya file)."""
    from safetensors.torch import load

    folder = write_shapes(tmp_path / "stars", [("star", "red"), ("star", "blue")], ["a red {token} shape", "a blue {token} shape"])
    client.upload_dataset(f"{name}-stars", folder)
    job_id = client.start_training(
        "pivotal_tuning", dataset=f"{name}-stars", adapter_name=name, token=f"<{name}>", num_vectors=2,
        train_lora_with_embedding=True, batch_size=1, rank=1, train_text_encoder=True, **options,
    )  # fmt: skip
    final = list(client.watch_job(job_id, timeout=300))[-1]
    assert isinstance(final, JobStatus) and final.state == "succeeded" and final.adapter_id, final
    images = [e for e in client.generate(f"a red <{name}> shape <lora:{name}:1>", seed=1, num_steps=4) if isinstance(e, Image)]
    assert len(images) == 1 and name in images[0].infotext
    _, blob = client.download_job_output(job_id, "kohya")
    return job_id, list(load(blob))


def test_text_encoder_only_pivotal_job_changes_no_unet_weight(served, tmp_path):
    """lora.text_encoder_only with a text prior: the adapter holds the token and a text-encoder
    LoRA only, so a request naming it runs the base UNet; the next Generate draws with it."""
    _, client, _ = served
    _, keys = run_pivotal_star_job(
        client, tmp_path, "te-star", initializer_token="star", num_steps=2, embedding_steps=1, seed=5,
        text_encoder_only=True, text_prior_prompts=["a red circle", "a shape", ""], text_prior_weight=2.0,
    )  # fmt: skip
    lora_keys = [k for k in keys if k.startswith("lora_")]
    assert lora_keys and all(k.startswith("lora_te_") for k in lora_keys), lora_keys[:3]


def test_pivotal_job_with_both_priors_trains_every_part(served, tmp_path):
    """Every part pivotal tuning can train, with both priors, in one job: the token, a LoRA on the
    UNet's attention and on the text encoder, class images per "[filewords]" caption (from a
    caption holding a new token), and a text prior. The adapter holds all three parts and the
    next Generate uses it."""
    _, client, data = served
    job_id, keys = run_pivotal_star_job(
        client, tmp_path, "both-star", initializer_token="shape", num_steps=3, embedding_steps=2, seed=4,
        class_prompt="[filewords]", num_class_images=2, text_prior_prompts=["a red circle", ""],
    )  # fmt: skip
    # One class image per caption with the token taken out.
    class_dir = data / "training" / "jobs" / job_id / "class_images"
    assert sorted(p.read_text() for p in class_dir.glob("class_[0-9]*.txt")) == ["a blue shape", "a red shape"]
    assert any(k.startswith("lora_unet_") for k in keys) and any(k.startswith("lora_te_") for k in keys), keys[:4]
    assert any(not k.startswith("lora_") for k in keys), "the token's vectors are in the file"  # lora_pti's layout
    assert not any("resnets" in k for k in keys), "attention only: no LoCon"


def test_text_prior_options_are_checked_by_field(served, tmp_path):
    _, client, data = served
    write_shapes(data / "datasets" / "te-plain", [("star", "red")])
    token = dict(token="<t>", initializer_token="star")
    with pytest.raises(InvalidArgumentError, match="lora.text_prior_prompts: need lora.train_text_encoder"):
        client.start_training("pivotal_tuning", dataset="te-plain", adapter_name="t1", text_prior_prompts=["a shape"], **token)
    with pytest.raises(InvalidArgumentError, match="lora.text_prior_prompts: must not contain the new token"):
        client.start_training("pivotal_tuning", dataset="te-plain", adapter_name="t2", train_text_encoder=True, text_prior_prompts=["a <t>"], **token)
    with pytest.raises(InvalidArgumentError, match="lora.text_encoder_only"):
        client.start_training("textual_inversion", dataset="te-plain", adapter_name="t3", text_encoder_only=True, **token)
    with pytest.raises(InvalidArgumentError, match="lora.text_prior_weight"):
        client.start_training(
            "lora", dataset="te-plain", adapter_name="t4", instance_prompt="a shape", train_text_encoder=True,
            text_prior_prompts=["a shape"], text_prior_weight=-1.0,
        )  # fmt: skip


@pytest.mark.parametrize("dataset", ["../outside", "/etc", "a/../../b", "..", "sub/dir"])
def test_dataset_paths_outside_the_data_dir_are_refused(served, dataset):
    _, client, _ = served
    with pytest.raises(InvalidArgumentError, match="dataset"):
        client.start_training("lora", dataset=dataset, adapter_name="x1", num_steps=2)


@pytest.mark.parametrize("path", ["../evil.png", "/abs.png", "a/../../b.png"])
def test_upload_file_paths_with_dotdot_or_absolute_are_refused(served, path):
    _, client, data = served
    with pytest.raises(InvalidArgumentError, match="file.path"):
        client.upload_dataset("evil", {path: b"x"})
    assert not (data / "datasets" / "evil").exists()
    assert not (data / "evil.png").exists()


def test_bad_options_name_the_field(served, tmp_path):
    _, client, data = served
    write_shapes(data / "datasets" / "plain", [("star", "red")])
    with pytest.raises(InvalidArgumentError, match="instance_prompt"):
        client.start_training("dreambooth_lora", dataset="plain", adapter_name="db1")
    with pytest.raises(InvalidArgumentError, match="token"):
        client.start_training("textual_inversion", dataset="plain", adapter_name="ti1")
    with pytest.raises(InvalidArgumentError, match="adapter_name: 'bad/name' must be"):
        client.start_training("lora", dataset="plain", adapter_name="bad/name")
    with pytest.raises(InvalidArgumentError, match="no dataset"):
        client.start_training("lora", dataset="missing", adapter_name="x2")
    with pytest.raises(InvalidArgumentError, match="lr_scheduler: must be one of constant, cosine, linear, got 'warm'"):
        client.start_training("lora", dataset="plain", adapter_name="x3", lr_scheduler="warm")
    with pytest.raises(NotFoundError):
        client.get_job("nope")


def test_extra_class_prompts_get_their_own_class_images(served, tmp_path):
    """dreambooth.extra_class_prompts: the server draws class images for each of them beside
    class_prompt's, and each image keeps its prompt; the job trains (here with the base model's
    prediction as the class images' target, and the token contrast) and registers its adapter."""
    _, client, data = served
    write_shapes(data / "datasets" / "extra-stars", [("star", "red"), ("star", "blue")], ["a red sks shape", "a blue sks shape"])
    job_id = client.start_training(
        "dreambooth_lora", dataset="extra-stars", adapter_name="db-extra", instance_prompt="a sks shape", class_prompt="a shape",
        extra_class_prompts=["a red circle on a white background", "a blue square"], num_class_images=3, num_steps=2,
        batch_size=1, rank=1, seed=3, prior_target="base_model", token="sks", token_contrast_weight=2.0, train_text_encoder=True,
    )  # fmt: skip
    final = list(client.watch_job(job_id, timeout=300))[-1]
    assert isinstance(final, JobStatus) and final.state == "succeeded", final
    record = json.loads((data / "training" / "jobs" / job_id / "job.json").read_text())
    assert record["spec"]["prior_target"] == "base_model" and record["spec"]["token_contrast_weight"] == 2.0
    class_dir = data / "training" / "jobs" / job_id / "class_images"
    assert sorted(p.read_text() for p in class_dir.glob("class_[0-9]*.txt")) == ["a blue square", "a red circle on a white background", "a shape"]
    assert "db-extra" in [a.name for a in client.list_adapters()]


def test_cli_reads_extra_class_prompts_from_a_file_and_the_option(served, tmp_path, capsys):
    """The README's DreamBooth command, its prior options included, reaches the job's spec."""
    from impasto.cli import main

    server, client, data = served
    write_shapes(data / "datasets" / "cli-extra", [("star", "red")], ["a red sks shape"])
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# what our users write\na red circle\n\na green cross\n", encoding="utf-8")
    argv = ["train", "dreambooth_lora", "--target", server.target, "--dataset", "cli-extra", "--adapter-name", "cli-extra",
            "--instance-prompt", "a sks shape", "--class-prompt-file", str(prompts), "--extra-class-prompt", "a blue square",
            "--num-class-images", "3", "--steps", "1", "--batch-size", "1", "--rank", "1", "--detach",
            "--token", "sks", "--prior-target", "base_model", "--prior-loss-weight", "2", "--token-contrast-weight", "2",
            "--train-text-encoder", "--text-encoder-lr", "1e-3", "--conv", "--unet-lr", "2e-3"]  # fmt: skip
    assert main(argv) == 0
    job_id = capsys.readouterr().out.strip()
    assert list(client.watch_job(job_id, timeout=300))[-1].state == "succeeded"
    spec = json.loads((data / "training" / "jobs" / job_id / "job.json").read_text())["spec"]
    assert (spec["prior_target"], spec["prior_loss_weight"], spec["token_contrast_weight"]) == ("base_model", 2.0, 2.0)
    assert spec["train_text_encoder"] and spec["conv"] and (spec["text_encoder_lr"], spec["unet_lr"]) == pytest.approx((1e-3, 2e-3))
    class_dir = data / "training" / "jobs" / job_id / "class_images"
    # No class_prompt: the extra prompts alone hold the prior, the option's first.
    assert [p.read_text() for p in sorted(class_dir.glob("class_[0-9]*.txt"))] == ["a blue square", "a red circle", "a green cross"]


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(extra_class_prompts=["a red sks shape"]), r"dreambooth.extra_class_prompts\[0\]: must not contain the instance token 'sks'"),
        (dict(extra_class_prompts=["a circle", " "]), r"dreambooth.extra_class_prompts\[1\]: is empty"),
        (dict(extra_class_prompts=["[filewords]"]), r"dreambooth.extra_class_prompts\[0\]: \[filewords\] belongs in dreambooth.class_prompt"),
        (dict(extra_class_prompts=["a circle", "a square"], num_class_images=2), "dreambooth.num_class_images: 2 is fewer than the 3 class prompts"),
        (dict(prior_target="teacher"), "dreambooth.prior_target: must be one of noise, base_model, got 'teacher'"),
        (dict(prior_target="base_model", prior_loss_weight=0.0), "dreambooth.prior_target: only acts with prior preservation on"),
        (dict(token_contrast_weight=-1.0), "dreambooth.token_contrast_weight: must be >= 0, got -1.0"),
        (dict(token_contrast_weight=1.0, token=""), r"dreambooth.token_contrast_weight: needs the instance token \(textual_inversion.token"),
    ],
)
def test_prior_options_are_checked_by_field(served, options, message):
    _, client, data = served
    write_shapes(data / "datasets" / "extra-plain", [("star", "red")])
    with pytest.raises(InvalidArgumentError, match=message):
        client.start_training("dreambooth_lora", dataset="extra-plain", adapter_name="e1", instance_prompt="a sks shape", class_prompt="a shape", **{"token": "sks", **options})
    with pytest.raises(InvalidArgumentError, match="dreambooth.extra_class_prompts: only dreambooth_lora and pivotal_tuning"):
        client.start_training("lora", dataset="extra-plain", adapter_name="e2", instance_prompt="a shape", extra_class_prompts=["a circle"])
    with pytest.raises(InvalidArgumentError, match="dreambooth.token_contrast_weight: only dreambooth_lora and pivotal_tuning"):
        client.start_training("lora", dataset="extra-plain", adapter_name="e3", instance_prompt="a sks shape", token="sks", token_contrast_weight=1.0)


def test_token_contrast_job_fails_naming_a_caption_without_the_token(served):
    """The token contrast reads each caption without the token; a caption that has none would
    ask the same prompt for the instance and for the base image, so the job fails and says which."""
    _, client, data = served
    write_shapes(data / "datasets" / "contrast-mixed", [("star", "red"), ("star", "blue")], ["a red sks shape", "a blue star"])
    job_id = client.start_training(
        "dreambooth_lora", dataset="contrast-mixed", adapter_name="contrast-mixed", instance_prompt="a sks shape", token="sks",
        token_contrast_weight=1.0, num_steps=1, batch_size=1, rank=1,
    )  # fmt: skip
    final = list(client.watch_job(job_id, timeout=300))[-1]
    assert final.state == "failed" and "needs the token in every instance caption" in final.message and "001.png" in final.message, final


def test_cli_train_with_upload_and_progress_bar(served, tmp_path, capsys):
    from impasto.cli import main

    server, client, _ = served
    argv = ["train", "lora", "--target", server.target, "--upload", str(star_files(tmp_path)), "--dataset", "cli-stars",
            "--adapter-name", "cli-star", "--instance-prompt", "a sks shape", "--steps", "3", "--batch-size", "1", "--rank", "1",
            "--download-dir", str(tmp_path / "out"), "--sample-every", "3", "--sample-prompt", "a sks shape",
            "--samples-dir", str(tmp_path / "samples"), "--lr-scheduler", "linear", "--unet-lr", "3e-3"]  # fmt: skip
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert "3/3" in captured.err and "succeeded" in captured.err
    # The schedule reached the trainer: a flat rate would still read 3.0e-03 after the last step.
    assert "] 3/3 loss" in captured.err and "lr 0.0e+00 lora" in captured.err
    # Not a terminal: plain progress lines, not a redrawn bar (the in-process server's own
    # weight-loading bar also writes to this stderr, hence "\r[").
    assert "\r[" not in captured.err and "] 3/3 loss" in captured.err
    assert [p.name for p in (tmp_path / "samples").iterdir()] == ["step00003-a-sks-shape.png"]
    assert "adapter 'cli-star' registered" in captured.out
    assert (tmp_path / "out" / "cli-star.safetensors").is_file() and (tmp_path / "out" / "cli-star.diffusers.safetensors").is_file()
    assert main(["jobs", "--target", server.target]) == 0
    assert "cli-star" in capsys.readouterr().out
