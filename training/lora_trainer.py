"""LoRA fine-tuning: low-rank adapters on the UNet's attention (optionally its ResNet convs, LoCon,
and the text encoder's attention), trained on a folder of captioned images.

    config -> base weights (a fresh copy) -> dataset -> LoRA layers -> one phase of steps -> adapter

Captions come from the dataset (metadata.jsonl or sidecar .txt), else the instance prompt.
The result is a CanonicalAdapter (impasto.lora), written as kohya / diffusers / PEFT by its
exporters. The defaults are conservative (rank 4, attention only, lr 1e-3) and learn slowly on the
embedded shapes model; benchmarks/training_efficacy.py measured rank 8 + LoCon at lr 5e-3 to
learn its held-out shape in 300 steps (and, on that 1M-parameter UNet, to drift the other shapes
with it). SD 1.5 wants rank 8-32, lr 1e-4.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .core import (
    TEXT_ENCODER_TARGETS,
    UNET_ATTENTION_TARGETS,
    UNET_CONV_TARGETS,
    BaseComponents,
    FineTuner,
    OptimConfig,
    Phase,
    inject_lora,
    load_components,
)
from .data import load_dataset
from .text_prior import text_prior_of


@dataclass
class LoraTrainConfig:
    model_dir: str
    dataset: str  # a dataset folder (see data.py)
    instance_prompt: str = ""  # caption of images without one
    token: str = ""  # replaces `{token}` in captions
    num_steps: int = 300
    batch_size: int = 4
    seed: int = 0
    rank: int = 4
    alpha: float | None = None  # None: alpha = rank (scale 1)
    train_text_encoder: bool = False
    conv: bool = False  # LoCon: also the ResNet blocks' conv1 / conv2
    unet_lr: float = 1e-3
    text_encoder_lr: float = 1e-4
    gradient_checkpointing: bool = False
    masked_loss: bool = False
    snr_gamma: float | None = 5.0
    warmup_steps: int = 10
    lr_scheduler: str = "constant"  # core.LR_SCHEDULERS
    # False: no LoRA on the UNet, so the concept is learnt through the text encoder (its LoRA,
    # and the token's vectors in pivotal tuning); the UNet draws every other prompt as before.
    unet_lora: bool = True
    # Prompts whose text encodings the run holds to the base model's (text_prior.py); they
    # need a text encoder that trains.
    text_prior_prompts: tuple[str, ...] = ()
    text_prior_weight: float = 1.0

    def validate(self) -> None:
        if self.rank < 1:
            raise ValueError(f"rank must be >= 1, got {self.rank}")
        if self.num_steps < 1 or self.batch_size < 1:
            raise ValueError("num_steps and batch_size must be >= 1")
        if not self.unet_lora and not self.train_text_encoder:
            raise ValueError("unet_lora off needs train_text_encoder: the LoRA must go somewhere")
        if self.text_prior_prompts and not self.train_text_encoder:
            raise ValueError("text_prior_prompts need train_text_encoder: they hold what the text encoder's LoRA changes")


def add_lora(cfg: LoraTrainConfig, parts: BaseComponents) -> tuple[list[dict], dict]:
    """LoRA layers into the training copy; (optimizer groups, {component: module})."""
    alpha = float(cfg.alpha if cfg.alpha is not None else cfg.rank)
    groups, modules = [], {}
    if cfg.unet_lora:
        targets = UNET_ATTENTION_TARGETS + (UNET_CONV_TARGETS if cfg.conv else ())
        groups.append({"params": inject_lora(parts.unet, targets, cfg.rank, alpha, cfg.seed), "lr": cfg.unet_lr})
        modules["unet"] = parts.unet
    if cfg.train_text_encoder:
        groups.append({"params": inject_lora(parts.text_encoder, TEXT_ENCODER_TARGETS, cfg.rank, alpha, cfg.seed + 1), "lr": cfg.text_encoder_lr})
        modules["text_encoder"] = parts.text_encoder
    if cfg.gradient_checkpointing:
        parts.unet.enable_gradient_checkpointing()  # the UNet's activations carry the gradient either way
        if cfg.train_text_encoder:
            parts.text_encoder.gradient_checkpointing_enable()
    return groups, modules


def optim_config(cfg: LoraTrainConfig) -> OptimConfig:
    return OptimConfig(batch_size=cfg.batch_size, warmup_steps=cfg.warmup_steps, lr_scheduler=cfg.lr_scheduler, snr_gamma=cfg.snr_gamma, seed=cfg.seed)


def build(cfg: LoraTrainConfig, parts: BaseComponents | None = None) -> FineTuner:
    cfg.validate()
    parts = parts or load_components(cfg.model_dir)
    data = load_dataset(
        Path(cfg.dataset), resolution=parts.resolution, default_caption=cfg.instance_prompt, token=cfg.token, want_masks=cfg.masked_loss
    )
    groups, modules = add_lora(cfg, parts)
    phase = Phase("lora", cfg.num_steps, groups, trains_text_encoder=cfg.train_text_encoder)
    tuner = FineTuner(
        parts, data.examples, [phase], optim_config(cfg), masked_loss=cfg.masked_loss, trainable_modules=modules,
        text_prior=text_prior_of(cfg, parts),
    )  # fmt: skip
    tuner.skipped = data.skipped
    return tuner
