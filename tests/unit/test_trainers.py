"""The trainers on tiny components (text width 32, ~1M-parameter UNet): a few steps each.

Each checks what its method promises: the loss is finite and falls over a handful of steps on a
fixed batch; only the intended parameters change; the adapter exports load where they should
(diffusers' load_lora_weights, impasto.lora's own reader); a checkpoint resumes exactly.
"""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from training_fixtures import fixed_batch_seed, star_dataset, tiny_model_dir, write_shapes

from impasto.lora import load_adapter
from impasto.models.shapes import Scene, render
from impasto.training import dreambooth, lora_trainer, pivotal_tuning, textual_inversion
from impasto.training.core import load_components, token_ids
from impasto.training.outputs import write_outputs


@pytest.fixture(autouse=True)
def single_torch_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def base_params(parts) -> dict[str, torch.Tensor]:
    out = {}
    for prefix, module in (("unet", parts.unet), ("text_encoder", parts.text_encoder), ("vae", parts.vae)):
        for name, p in module.named_parameters():
            if "lora_" not in name:
                out[f"{prefix}.{name.replace('.base_layer', '')}"] = p.detach().clone()
    return out


def changed(before: dict, after: dict) -> set[str]:
    return {k for k in before if not torch.equal(before[k], after[k])}


def train_fixed(tuner, steps: int) -> list[float]:
    fixed_batch_seed(tuner)
    return [tuner.train_step().loss for _ in range(steps)]


def falls(losses: list[float]) -> bool:
    return all(np.isfinite(losses)) and losses[-1] < losses[0] and np.mean(losses[-2:]) < np.mean(losses[:2])


def lora_config(**kw):
    base = dict(model_dir=str(tiny_model_dir()), dataset=str(star_dataset()), token="sks", num_steps=6, batch_size=2, rank=2, unet_lr=1e-2, warmup_steps=0)
    return lora_trainer.LoraTrainConfig(**{**base, **kw})


def test_lora_learns_and_changes_only_lora(tmp_path):
    parts = load_components(tiny_model_dir())
    before = base_params(parts)
    tuner = lora_trainer.build(lora_config(), parts)
    assert falls(train_fixed(tuner, 6))
    assert changed(before, base_params(parts)) == set()
    adapter = tuner.adapter()
    assert adapter.components == ["unet"] and set(adapter.ranks) == {2}
    assert all(t.rsplit(".", 1)[-1] in ("to_q", "to_k", "to_v", "0") for t in adapter.modules)
    assert any(m.up.abs().sum() > 0 for m in adapter.modules.values())

    # Exports: our own reader gets the same modules back; diffusers' load_lora_weights loads
    # the diffusers file and fusing it changes the UNet weights by exactly our delta.
    files = write_outputs(adapter, tmp_path, "t")
    back = load_adapter(files["kohya"])
    assert back.content_hash == adapter.content_hash
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tiny_model_dir(), safety_checker=None)
    target = next(iter(adapter.modules))
    path = target.removeprefix("unet.")
    base_w = pipe.unet.get_submodule(path).weight.detach().clone()
    pipe.load_lora_weights(str(files["diffusers"]), adapter_name="t")
    pipe.fuse_lora(lora_scale=1.0)
    fused = pipe.unet.get_submodule(path).base_layer.weight if hasattr(pipe.unet.get_submodule(path), "base_layer") else pipe.unet.get_submodule(path).weight
    assert torch.allclose(fused - base_w, adapter.modules[target].delta(), atol=1e-5)

    # The PEFT zip unpacks to a folder PeftModel loads, with the same delta.
    import shutil

    from diffusers import UNet2DConditionModel
    from peft import PeftModel

    shutil.unpack_archive(files["peft_unet"], tmp_path / "peft_unet")
    unet = UNet2DConditionModel.from_pretrained(tiny_model_dir() / "unet")
    merged = PeftModel.from_pretrained(unet, str(tmp_path / "peft_unet")).merge_and_unload()
    assert torch.allclose(merged.get_submodule(path).weight - base_w, adapter.modules[target].delta(), atol=1e-5)


def test_locon_and_text_encoder_targets_with_their_own_learning_rates():
    parts = load_components(tiny_model_dir())
    before = base_params(parts)
    cfg = lora_config(conv=True, train_text_encoder=True, text_encoder_lr=3e-3, gradient_checkpointing=True, alpha=1.0)
    tuner = lora_trainer.build(cfg, parts)
    assert falls(train_fixed(tuner, 5))
    assert changed(before, base_params(parts)) == set()
    adapter = tuner.adapter()
    assert adapter.components == ["unet", "text_encoder"]
    assert any(m.is_conv for m in adapter.modules.values())
    assert all(m.alpha == 1.0 for m in adapter.modules.values())
    assert [g["lr"] for g in tuner.optimizer.param_groups] == [1e-2, 3e-3]


def render_class_images(items: list[tuple[str, int]]) -> list[np.ndarray]:
    return [render(Scene(random.Random(seed).choice(["circle", "square"]), "red", "white", 32, 32, 16)) for _, seed in items]


def test_dreambooth_uses_class_images_and_prior_weight(tmp_path):
    parts = load_components(tiny_model_dir())
    before = base_params(parts)
    cfg = dreambooth.DreamBoothConfig(
        **{**lora_config().__dict__, "instance_prompt": "a sks shape"},
        class_prompt="a shape", class_dir=str(tmp_path / "class"), num_class_images=3, prior_loss_weight=0.5,
    )
    files = dreambooth.ensure_class_images(cfg, render_class_images)
    assert len(files) == 3 and dreambooth.ensure_class_images(cfg, lambda *a: pytest.fail("regenerated")) == files
    tuner = dreambooth.build(cfg, parts)
    assert tuner.classes is not None and len(tuner.classes) == 3 and tuner.prior_loss_weight == 0.5
    assert falls(train_fixed(tuner, 6))
    assert changed(before, base_params(parts)) == set()


def test_prior_target_base_model_holds_the_class_half_to_the_base_prediction(tmp_path):
    """prior_target "base_model": the class images' target is the base model's own prediction
    (adapters off), not the drawn noise. At the first step the LoRA is still inert (B = 0), so the
    class half's error is zero: the loss is the instance loss alone, whatever the prior's weight;
    with the noise target it grows with the weight. After some steps (a text-encoder LoRA too),
    the target is still the base model's prediction exactly, and requires_grad is as it was."""

    def first_step(prior_target: str, weight: float, **kw):
        cfg = dreambooth.DreamBoothConfig(
            **{**lora_config(**kw).__dict__, "instance_prompt": "a sks shape"}, class_prompt="a shape",
            class_dir=str(tmp_path / "class"), num_class_images=3, prior_loss_weight=weight, prior_target=prior_target,
        )  # fmt: skip
        dreambooth.ensure_class_images(cfg, render_class_images)
        tuner = dreambooth.build(cfg)
        return tuner, tuner.train_step().loss

    assert first_step("base_model", 5.0)[1] == pytest.approx(first_step("base_model", 1.0)[1], rel=1e-5)
    assert first_step("noise", 5.0)[1] > first_step("noise", 1.0)[1] * 1.2

    tuner, _ = first_step("base_model", 1.0, train_text_encoder=True, text_encoder_lr=1e-2)
    for _ in range(3):
        tuner.train_step()
    base = load_components(tiny_model_dir())
    noisy, t = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1)), torch.tensor([100, 700])
    ids = base.tokenizer(["a shape"] * 2, padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        expected = base.unet(noisy, t, base.text_encoder(ids)[0]).sample
        context = tuner._encode(["a shape"] * 2, with_grad=False)  # through the text encoder's LoRA
        trained = tuner.parts.unet(noisy, t, context).sample
    assert not torch.allclose(trained, expected, atol=1e-6)  # the LoRAs have moved
    flags = [p.requires_grad for p in [*tuner.parts.unet.parameters(), *tuner.parts.text_encoder.parameters()]]
    assert torch.allclose(tuner._base_prediction(noisy, t, ["a shape"] * 2, context), expected, atol=1e-6)
    assert [p.requires_grad for p in [*tuner.parts.unet.parameters(), *tuner.parts.text_encoder.parameters()]] == flags
    with pytest.raises(ValueError, match="prior_target"):
        dreambooth.DreamBoothConfig(**{**lora_config().__dict__, "instance_prompt": "a sks shape"}, prior_target="teacher").validate()


def test_token_contrast_holds_the_captions_without_the_token_to_the_base_model(tmp_path):
    """token_contrast_weight: the instance latents, read with the token taken out of their
    captions ("a red sks shape" -> "a red shape"), are held to the base model's prediction. At
    the first step the LoRA is inert, so the contrast adds nothing to the loss, whatever its
    weight; after training, the LoRA has moved the prediction for the captions without the token
    much less than the same run without the contrast (the instance loss is the same in both)."""
    noisy, t = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(1)), torch.tensor([100, 400, 700, 950])
    stripped = ["a red shape", "a blue shape", "a green shape", "a yellow shape"]
    base = load_components(tiny_model_dir())
    with torch.no_grad():
        expected = base.unet(noisy, t, base.text_encoder(token_ids(base.tokenizer, stripped))[0]).sample

    def run(weight: float, steps: int, **kw):
        cfg = dreambooth.DreamBoothConfig(
            **{**lora_config(unet_lr=3e-2, conv=True, num_steps=steps, **kw).__dict__, "instance_prompt": "a sks shape"}, prior_loss_weight=0.0,
            token_contrast_weight=weight,
        )  # fmt: skip
        tuner = dreambooth.build(cfg)
        losses = [tuner.train_step().loss for _ in range(steps)]
        with torch.no_grad():
            drift = (tuner.parts.unet(noisy, t, tuner._encode(stripped, with_grad=False)).sample - expected).pow(2).mean().item()
        return tuner, losses, drift

    tuner, first, _ = run(5.0, 1)
    assert sorted(tuner.contrast_captions) == sorted(stripped)
    assert first[0] == pytest.approx(run(0.0, 1)[1][0], rel=1e-6) == pytest.approx(run(1.0, 1)[1][0], rel=1e-6)
    _, _, drift_without = run(0.0, 12)
    _, losses, drift_with = run(5.0, 12)
    assert all(np.isfinite(losses)) and drift_with < 0.5 * drift_without
    # With a text-encoder LoRA too: the contrast rows' captions go through it, and the contrast
    # still holds them. (That the base model's target is encoded again with the LoRA off is
    # checked by test_prior_target_base_model_holds_the_class_half_to_the_base_prediction.)
    _, losses, drift_te = run(5.0, 12, train_text_encoder=True, text_encoder_lr=1e-2)
    _, _, drift_te_without = run(0.0, 12, train_text_encoder=True, text_encoder_lr=1e-2)
    assert all(np.isfinite(losses)) and drift_te > 0
    assert drift_te < 0.5 * drift_te_without

    with pytest.raises(ValueError, match="needs the instance token"):
        dreambooth.DreamBoothConfig(**{**lora_config(token="").__dict__, "instance_prompt": "a sks shape"}, token_contrast_weight=1.0).validate()
    with pytest.raises(ValueError, match="token_contrast_weight must be >= 0"):
        dreambooth.DreamBoothConfig(**{**lora_config().__dict__, "instance_prompt": "a sks shape"}, token_contrast_weight=-1.0).validate()
    untokened = write_shapes(tmp_path / "plain", [("star", "red")], ["a red star"])
    with pytest.raises(ValueError, match="000.png"):
        dreambooth.build(dreambooth.DreamBoothConfig(**{**lora_config(dataset=str(untokened)).__dict__, "instance_prompt": "a sks shape"}, prior_loss_weight=0.0, token_contrast_weight=1.0))


def test_dreambooth_filewords_class_prompts_follow_the_captions(tmp_path):
    """`[filewords]`: one class prompt per instance caption, the token taken out; the class
    images are split between them in blocks, each image keeps its own prompt, and a resumed
    run draws only what is missing, with the same seed per image."""
    cfg = dreambooth.DreamBoothConfig(
        **{**lora_config().__dict__, "instance_prompt": "a sks shape"},
        class_prompt="a photo of [filewords]", class_dir=str(tmp_path / "class"), num_class_images=6,
    )
    # star_dataset's captions: "a {red,blue,green,yellow} {token} shape"
    assert dreambooth.class_prompts(cfg) == [f"a photo of a {c} shape" for c in ("red", "blue", "green", "yellow")]
    plan = dreambooth.class_prompt_plan(cfg)
    assert plan == ["a photo of a red shape"] * 2 + ["a photo of a blue shape"] * 2 + ["a photo of a green shape", "a photo of a yellow shape"]
    calls = []

    def generator(items):
        calls.append(list(items))
        return render_class_images(items)

    # Calls of up to `batch` images mix prompts (a server batches them); image i has seed 10_000 + i.
    files = dreambooth.ensure_class_images(cfg, generator, batch=4)
    assert calls == [list(zip(plan[:4], range(10_000, 10_004))), list(zip(plan[4:], range(10_004, 10_006)))]
    assert [f.with_suffix(".txt").read_text() for f in files] == plan
    files[-1].unlink()  # as if the run had died before the last image
    calls.clear()
    assert dreambooth.ensure_class_images(cfg, generator) == files and calls == [[("a photo of a yellow shape", 10_005)]]
    tuner = dreambooth.build(cfg, load_components(tiny_model_dir()))
    assert sorted(tuner.class_captions) == sorted(plan)
    files[-1].unlink()
    with pytest.raises(RuntimeError, match="returned 0 images for 1 prompts"):
        dreambooth.ensure_class_images(cfg, lambda items: [])


def test_dreambooth_extra_class_prompts_join_the_plan(tmp_path):
    """extra_class_prompts follow class_prompt (or stand alone); the images are split evenly,
    each trained with its own prompt; by default every prompt gets an image."""
    base = {**lora_config().__dict__, "instance_prompt": "a sks shape"}
    cfg = dreambooth.DreamBoothConfig(
        **base, class_prompt="a shape", extra_class_prompts=("a red circle", "a  blue square", "a shape"),
        class_dir=str(tmp_path / "class"), num_class_images=5,
    )  # fmt: skip
    assert dreambooth.class_prompts(cfg) == ["a shape", "a red circle", "a blue square"]  # spaces folded, repeats once
    assert dreambooth.class_prompt_plan(cfg) == ["a shape"] * 2 + ["a red circle"] * 2 + ["a blue square"]
    files = dreambooth.ensure_class_images(cfg, render_class_images)
    tuner = dreambooth.build(cfg, load_components(tiny_model_dir()))
    assert sorted(tuner.class_captions) == sorted(f.with_suffix(".txt").read_text() for f in files) == sorted(dreambooth.class_prompt_plan(cfg))
    # Alone, and the default count: 50, or one image per prompt when there are more.
    alone = dreambooth.DreamBoothConfig(**base, extra_class_prompts=tuple(f"a red circle {i}" for i in range(60)), class_dir="x")
    alone.validate()
    assert len(dreambooth.class_prompt_plan(alone)) == 60
    assert len(dreambooth.class_prompt_plan(dreambooth.DreamBoothConfig(**base, class_prompt="a shape", class_dir="x"))) == 50


@pytest.mark.parametrize(
    "extra, count, message",
    [
        (("a red sks shape",), 0, "must not contain the instance token 'sks'"),
        (("[filewords]",), 0, "plain prompts"),
        (("",), 0, "plain prompts"),
        (("a red circle", "a blue square"), 2, r"num_class_images \(2\) is below the number of class prompts \(3\)"),
    ],
)
def test_dreambooth_extra_class_prompts_are_checked(tmp_path, extra, count, message):
    cfg = dreambooth.DreamBoothConfig(
        **{**lora_config().__dict__, "instance_prompt": "a sks shape"}, class_prompt="a shape", extra_class_prompts=extra,
        class_dir=str(tmp_path), num_class_images=count,
    )  # fmt: skip
    with pytest.raises(ValueError, match=message):
        cfg.validate()
        dreambooth.class_prompt_plan(cfg)


def test_dreambooth_filewords_needs_the_token():
    with pytest.raises(ValueError, match="instance token"):
        dreambooth.DreamBoothConfig(**{**lora_config().__dict__, "token": "", "instance_prompt": "a sks shape"}, class_prompt="[filewords]", class_dir="x").validate()


def test_textual_inversion_trains_only_the_new_rows(tmp_path):
    parts = load_components(tiny_model_dir())
    table_before = parts.text_encoder.get_input_embeddings().weight.detach().clone()
    before = {k: v for k, v in base_params(parts).items() if "token_embedding" not in k}
    cfg = textual_inversion.TextualInversionConfig(
        str(tiny_model_dir()), str(star_dataset()), token="<sks>", initializer_token="star", num_vectors=2,
        num_steps=6, batch_size=2, learning_rate=5e-2, warmup_steps=0,
    )
    tuner = textual_inversion.build(cfg, parts)
    assert falls(train_fixed(tuner, 6))
    after = {k: v for k, v in base_params(parts).items() if "token_embedding" not in k}
    assert changed(before, after) == set()
    table = parts.text_encoder.get_input_embeddings().weight.detach()
    old = table_before.shape[0]
    assert torch.equal(table[:old], table_before)  # every existing token is untouched
    new_rows = table[old:]
    assert new_rows.shape[0] == 2 and not torch.equal(new_rows[0], table_before[parts.tokenizer.convert_tokens_to_ids("star</w>")])
    adapter = tuner.adapter()
    assert not adapter.modules and adapter.embeddings["<sks>"]["text_encoder"].shape == (2, 32)
    files = write_outputs(adapter, tmp_path, "ti")
    assert set(files) == {"kohya", "embeddings"}
    # A1111's embedding file: no token inside (A1111 uses the file's name), so it is given here.
    back = load_adapter(files["kohya"], token_name="<sks>")
    assert back.source_format == "embedding" and back.content_hash == adapter.content_hash
    assert load_adapter(files["embeddings"]).content_hash == adapter.content_hash  # diffusers' file keeps the token


def test_textual_inversion_refuses_a_known_word():
    cfg = textual_inversion.TextualInversionConfig(str(tiny_model_dir()), str(star_dataset()), token="red", initializer_token="star")
    with pytest.raises(ValueError, match="already in the tokenizer"):
        textual_inversion.build(cfg)


def test_pivotal_tuning_embeddings_then_lora_in_one_adapter(tmp_path):
    parts = load_components(tiny_model_dir())
    cfg = pivotal_tuning.PivotalTuningConfig(**{**lora_config(num_steps=6).__dict__, "token": "<sks>"}, initializer_token="star", embedding_steps=3)
    tuner = pivotal_tuning.build(cfg, parts)
    fixed_batch_seed(tuner)
    for _ in range(3):
        assert tuner.train_step().phase == "embedding"
    assert all(m.up.abs().sum() == 0 for m in tuner.adapter().modules.values())  # LoRA still inert
    vectors = tuner.embeddings.vectors()
    for _ in range(3):
        assert tuner.train_step().phase == "lora"
    assert torch.equal(tuner.embeddings.vectors(), vectors)  # the pivot holds in phase 2
    adapter = tuner.adapter()
    assert adapter.modules and "<sks>" in adapter.embeddings
    files = write_outputs(adapter, tmp_path, "p")
    assert {"kohya", "diffusers", "embeddings", "peft_unet"} <= set(files)
    back = load_adapter(files["kohya"])
    assert back.content_hash == adapter.content_hash  # one file holds both


def test_pivotal_tuning_with_prior_uses_class_images_in_the_lora_phase_only(tmp_path):
    """Class images' captions hold no new token: in the embedding phase they would cost a UNet
    half for a zero gradient, so only the LoRA phase draws them (diffusers' advanced
    DreamBooth-LoRA script trains its tokens with the prior on; ours keeps them apart)."""
    parts = load_components(tiny_model_dir())
    cfg = pivotal_tuning.PivotalTuningConfig(
        **{**lora_config(num_steps=4).__dict__, "token": "<sks>"}, initializer_token="star", embedding_steps=2,
        class_prompt="a shape", class_dir=str(tmp_path / "class"), num_class_images=3, prior_loss_weight=0.5,
    )  # fmt: skip
    dreambooth.ensure_class_images(cfg, render_class_images)
    tuner = pivotal_tuning.build(cfg, parts)
    assert tuner.classes is not None and tuner.prior_loss_weight == 0.5
    batch_sizes = []
    hook = parts.unet.register_forward_pre_hook(lambda module, args: batch_sizes.append(len(args[0])))
    phases = [tuner.train_step().phase for _ in range(4)]
    hook.remove()
    assert phases == ["embedding"] * 2 + ["lora"] * 2
    assert batch_sizes == [2, 2, 4, 4]  # batch_size 2, plus 2 class images in the LoRA phase


def test_pivotal_tuning_lora_with_embedding_trains_both_then_lora_alone(tmp_path):
    """diffusers' order: the LoRA and the token rows train together, with the class images
    (the LoRA gets their gradient), then the token is frozen and the LoRA goes on."""
    parts = load_components(tiny_model_dir())
    cfg = pivotal_tuning.PivotalTuningConfig(
        **{**lora_config(num_steps=4).__dict__, "token": "<sks>"}, initializer_token="star", embedding_steps=2,
        class_prompt="a shape", class_dir=str(tmp_path / "class"), num_class_images=3, prior_loss_weight=0.5,
        train_lora_with_embedding=True,
    )  # fmt: skip
    dreambooth.ensure_class_images(cfg, render_class_images)
    tuner = pivotal_tuning.build(cfg, parts)
    start = tuner.embeddings.vectors()
    batch_sizes = []
    hook = parts.unet.register_forward_pre_hook(lambda module, args: batch_sizes.append(len(args[0])))
    phases = [tuner.train_step().phase for _ in range(2)]
    assert not torch.equal(tuner.embeddings.vectors(), start)
    assert any(m.up.abs().sum() > 0 for m in tuner.adapter().modules.values())  # the LoRA moved in phase 1
    pivot = tuner.embeddings.vectors()
    phases += [tuner.train_step().phase for _ in range(2)]
    hook.remove()
    assert phases == ["embedding+lora"] * 2 + ["lora"] * 2
    assert batch_sizes == [4, 4, 4, 4]  # class images in both phases
    assert torch.equal(tuner.embeddings.vectors(), pivot)  # frozen once the LoRA goes on alone


def test_lr_schedules_decay_within_each_phase():
    """cosine and linear fall from the phase's rate to 0 at its end (diffusers' schedules), and a
    new phase starts again from its own rate; constant stays flat after the warmup."""
    rates = {}
    for schedule in ("constant", "cosine", "linear"):
        tuner = lora_trainer.build(lora_config(num_steps=6, lr_scheduler=schedule))
        rates[schedule] = [tuner.train_step().learning_rate for _ in range(6)]  # the rate of the next step
    assert rates["constant"] == [1e-2] * 6
    for schedule in ("cosine", "linear"):
        assert all(a > b for a, b in zip(rates[schedule], rates[schedule][1:])) and rates[schedule][-1] == 0.0, rates
    assert rates["linear"][:5] == pytest.approx([1e-2 * (5 - i) / 6 for i in range(5)])

    cfg = pivotal_tuning.PivotalTuningConfig(
        **{**lora_config(num_steps=6, lr_scheduler="cosine").__dict__, "token": "<sks>"}, initializer_token="star", embedding_steps=3,
        embedding_lr=5e-2,
    )  # fmt: skip
    tuner = pivotal_tuning.build(cfg)
    rates = [tuner.train_step().learning_rate for _ in range(6)]
    # Three steps per phase: 3/4, 1/4, then 0 of the token's rate, then of the LoRA's.
    assert rates == pytest.approx([0.75 * 5e-2, 0.25 * 5e-2, 0.0, 0.75 * 1e-2, 0.25 * 1e-2, 0.0])


def test_textual_inversion_takes_a_schedule():
    cfg = textual_inversion.TextualInversionConfig(
        str(tiny_model_dir()), str(star_dataset()), token="<sks>", initializer_token="star", num_steps=4, warmup_steps=0, learning_rate=4e-2
    )  # fmt: skip
    assert cfg.lr_scheduler == "cosine"  # the default: the steadiest on the shipped model (textual_inversion.py)
    cfg.lr_scheduler = "constant"
    assert textual_inversion.build(cfg).train_step().learning_rate == 4e-2
    cfg.lr_scheduler = "linear"
    tuner = textual_inversion.build(cfg)
    assert [tuner.train_step().learning_rate for _ in range(4)] == pytest.approx([3e-2, 2e-2, 1e-2, 0.0])


def test_unknown_lr_scheduler_is_refused_by_name():
    with pytest.raises(ValueError, match="lr_scheduler must be one of constant, cosine, linear"):
        lora_trainer.build(lora_config(lr_scheduler="cosine_with_restarts"))


def test_pivotal_prior_needs_the_class_fields():
    with pytest.raises(ValueError, match=r"class_prompt \(or extra_class_prompts\) and class_dir"):
        pivotal_tuning.PivotalTuningConfig(**{**lora_config().__dict__, "token": "<sks>"}, initializer_token="star", prior_loss_weight=1.0).validate()


@pytest.mark.parametrize("schedule", ["constant", "cosine"])
def test_checkpoint_resumes_exactly(schedule):
    straight = lora_trainer.build(lora_config(num_steps=6, lr_scheduler=schedule))
    for _ in range(6):
        straight.train_step()

    first = lora_trainer.build(lora_config(num_steps=6, lr_scheduler=schedule))
    for _ in range(3):
        first.train_step()
    state = first.state_dict()
    resumed = lora_trainer.build(lora_config(num_steps=6, lr_scheduler=schedule))
    resumed.load_state_dict(state)
    assert resumed.step == 3
    for _ in range(3):
        resumed.train_step()
    a, b = straight.adapter(), resumed.adapter()
    for target in a.modules:
        assert torch.allclose(a.modules[target].up, b.modules[target].up, atol=1e-6)


def test_pivotal_with_embedding_resumes_exactly_across_its_phases():
    """A checkpoint in the joint phase, resumed into the LoRA-only phase: the same adapter as a
    run that never stopped (phase 2's optimizer starts from the settings either way)."""

    def build():
        cfg = pivotal_tuning.PivotalTuningConfig(
            **{**lora_config(num_steps=6).__dict__, "token": "<sks>"}, initializer_token="star", embedding_steps=3,
            train_lora_with_embedding=True,
        )  # fmt: skip
        return pivotal_tuning.build(cfg)

    straight = build()
    for _ in range(6):
        straight.train_step()
    first = build()
    for _ in range(2):
        first.train_step()
    resumed = build()
    resumed.load_state_dict(first.state_dict())
    for _ in range(4):
        resumed.train_step()
    a, b = straight.adapter(), resumed.adapter()
    assert torch.equal(straight.embeddings.vectors(), resumed.embeddings.vectors())
    for target in a.modules:
        assert torch.allclose(a.modules[target].up, b.modules[target].up, atol=1e-6)


def test_masked_loss_counts_only_the_mask(tmp_path):
    folder = write_shapes(tmp_path / "masked", [("star", "red"), ("star", "blue")])
    from PIL import Image

    (folder / "masks").mkdir()
    for i in range(2):
        Image.new("L", (64, 64), 0).save(folder / "masks" / f"{i:03d}.png")
    (folder / "metadata.jsonl").write_text("\n".join(f'{{"file": "{i:03d}.png", "caption": "a sks shape", "mask": "masks/{i:03d}.png"}}' for i in range(2)))
    tuner = lora_trainer.build(lora_config(dataset=str(folder), masked_loss=True))
    assert tuner.train_step().loss == 0.0  # an all-zero mask: nothing to learn
    with pytest.raises(ValueError, match="mask"):
        lora_trainer.build(lora_config(masked_loss=True))  # a dataset without masks


def test_saved_embeddings_load_into_a_fresh_copy():
    from impasto.training.core import add_saved_embeddings

    cfg = textual_inversion.TextualInversionConfig(str(tiny_model_dir()), str(star_dataset()), token="<s2>", initializer_token="star", num_vectors=2, num_steps=2, batch_size=1)
    tuner = textual_inversion.build(cfg)
    tuner.train_step()
    tuner.train_step()
    fresh = load_components(tiny_model_dir())
    expanded = add_saved_embeddings(fresh.tokenizer, fresh.text_encoder, tuner.adapter().embeddings)
    assert expanded == {"<s2>": "<s2> <s2>_1"}

    def encode(parts, text):
        ids = parts.tokenizer([text], padding="max_length", max_length=77, return_tensors="pt").input_ids
        with torch.no_grad():
            return parts.text_encoder(ids)[0]

    assert torch.allclose(encode(fresh, "a <s2> <s2>_1 shape"), encode(tuner.parts, "a <s2> <s2>_1 shape"))


def test_text_encoder_only_pivotal_tuning_leaves_the_unet_and_holds_the_prior_prompts(tmp_path):
    """unet_lora off: the concept goes into the token and a text-encoder LoRA; the UNet's weights
    never move, and the text prior keeps the encodings of prompts without the token near the
    base model's (much nearer than the same run without it)."""
    prior_prompts = ("a red circle", "a blue square on a white background", "a shape")

    def run(with_prior: bool):
        parts = load_components(tiny_model_dir())
        before = base_params(parts)
        lora = lora_config(
            num_steps=6, rank=4, text_encoder_lr=5e-2, unet_lora=False, train_text_encoder=True,
            text_prior_prompts=prior_prompts if with_prior else (), text_prior_weight=100.0,
        )  # fmt: skip
        cfg = pivotal_tuning.PivotalTuningConfig(
            **{**lora.__dict__, "token": "<sks>"}, initializer_token="star", embedding_steps=3, train_lora_with_embedding=True
        )
        tuner = pivotal_tuning.build(cfg, parts)
        ids = parts.tokenizer(list(prior_prompts), padding="max_length", max_length=77, return_tensors="pt").input_ids
        with torch.no_grad():
            start = parts.text_encoder(ids)[0]
        losses = train_fixed(tuner, 6)
        with torch.no_grad():
            drift = float((parts.text_encoder(ids)[0] - start).pow(2).mean())
        return tuner, before, base_params(parts), losses, drift

    tuner, before, after, losses, drift_with = run(True)
    assert all(np.isfinite(losses))
    assert not any(k.startswith("unet.") for k in changed(before, after))  # no UNet LoRA, base frozen
    adapter = tuner.adapter()
    assert adapter.modules and all(name.startswith("text_encoder") for name in adapter.modules)
    assert "<sks>" in adapter.embeddings
    assert {"kohya", "diffusers"} <= set(write_outputs(adapter, tmp_path, "te"))
    *_, drift_without = run(False)
    assert drift_with < drift_without / 4, (drift_with, drift_without)


def test_text_prior_is_refused_where_it_cannot_act():
    with pytest.raises(ValueError, match="train_text_encoder"):
        lora_config(text_prior_prompts=("a red circle",)).validate()
    with pytest.raises(ValueError, match="unet_lora"):
        lora_config(unet_lora=False).validate()
    parts = load_components(tiny_model_dir())
    cfg = pivotal_tuning.PivotalTuningConfig(
        **{**lora_config(train_text_encoder=True, text_prior_prompts=("a red <sks> shape",)).__dict__, "token": "<sks>"},
        initializer_token="star",
    )  # fmt: skip
    with pytest.raises(ValueError, match="must not contain the new token"):
        pivotal_tuning.build(cfg, parts)
