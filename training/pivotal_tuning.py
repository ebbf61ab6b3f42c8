"""Pivotal tuning (cloneofsimo's lora_pti): textual inversion first, then LoRA with the new token
held fixed, saved as one adapter holding both the LoRA modules and the token's vectors.

    config -> base weights -> the token -> dataset -> LoRA layers (B = 0, so inert in phase 1)
           -> phase 1: token rows only -> phase 2: LoRA only -> one adapter

`train_lora_with_embedding` runs diffusers' advanced DreamBooth-LoRA script's order instead
(its --train_text_encoder_ti, whose fraction of the run is our embedding_steps): the LoRA trains
from the first step, beside the token rows, and goes on alone once they are frozen. On the
embedded shapes model (impasto-shapes-v2), with prior preservation, that drew 97-100% star over
three training seeds after 400 steps (52 s) with the base classes at 52-56% (100% before); the
sequential order drew 75-91% (400 + 400 steps, base classes 50-56%), and DreamBooth-LoRA
94-100% with them at 19-26% (benchmarks/training_efficacy.py, 2026-11-28, judged stars that are
well formed). With the captions prior, the base_model target, the token contrast and a
text-encoder LoRA (rank 64, lr 2e-3, 500 steps; dreambooth.py) diffusers' order drew 95%, 95%,
100% star with the base classes at 98%, 97%, 99%, level with DreamBooth-LoRA on the same
settings (2026-12-08).

Finding the token first gives the LoRA a "pivot" in the text space that already points at
the concept, so the LoRA needs to move the UNet less (and forgets less).

Prior preservation is optional, as in diffusers' advanced DreamBooth-LoRA script (its
--train_text_encoder_ti with --with_prior_preservation): the same class fields as DreamBooth
(class images made by `dreambooth.ensure_class_images`), used in every phase the LoRA trains in.
With diffusers' settings it drifts less than DreamBooth-LoRA, but still drifts (the first
figures above, rank 8, LoCon); the token contrast is what holds the rest. With
`unet_lora=False` and `train_text_encoder` the LoRA goes on the text encoder only, and
`text_prior_prompts` (text_prior.py) hold other prompts' encodings: the UNet is never touched. On v2 the base classes then stayed at 100%, but the
untouched UNet drew the token as specks most of the time and a well-formed star 25%, 25%, 6%
of the time over three training seeds (2026-11-28).
"""

from __future__ import annotations

from dataclasses import dataclass

from .core import BaseComponents, FineTuner, Phase, load_components
from .dreambooth import contrast_captions_of, load_class_examples, validate_class_fields
from .lora_trainer import LoraTrainConfig, add_lora, optim_config
from .text_prior import text_prior_of
from .textual_inversion import add_token, load_token_dataset


@dataclass
class PivotalTuningConfig(LoraTrainConfig):
    initializer_token: str = ""
    num_vectors: int = 1
    embedding_steps: int = 0  # 0: half of num_steps
    embedding_lr: float = 5e-2
    # Prior preservation (off unless prior_loss_weight > 0): see dreambooth.py.
    class_prompt: str = ""
    class_dir: str = ""
    num_class_images: int = 0  # 0: dreambooth.DEFAULT_CLASS_IMAGES, or one per class prompt
    prior_loss_weight: float = 0.0
    class_seed: int = 10_000
    extra_class_prompts: tuple[str, ...] = ()
    prior_target: str = "noise"
    token_contrast_weight: float = 0.0  # see dreambooth.py; the token is `token`
    # The LoRA trains in the embedding phase too (diffusers' order), not only after it (lora_pti's).
    train_lora_with_embedding: bool = False

    def validate(self) -> None:
        super().validate()
        if not self.token or not self.initializer_token:
            raise ValueError("pivotal tuning needs token and initializer_token")
        validate_class_fields(self)

    @property
    def phase_steps(self) -> tuple[int, int]:
        first = self.embedding_steps or self.num_steps // 2
        if not 0 < first < self.num_steps:
            raise ValueError(f"embedding_steps must be in 1..num_steps-1, got {first}")
        return first, self.num_steps - first


def build(cfg: PivotalTuningConfig, parts: BaseComponents | None = None) -> FineTuner:
    cfg.validate()
    parts = parts or load_components(cfg.model_dir)
    embeddings = add_token(cfg, parts)
    data = load_token_dataset(cfg, parts)
    lora_groups, modules = add_lora(cfg, parts)
    ti_steps, lora_steps = cfg.phase_steps
    # No weight decay on the vectors, as in textual inversion: it pulls them toward zero.
    token_group = {"params": embeddings.parameters(), "lr": cfg.embedding_lr, "weight_decay": 0.0}
    if cfg.train_lora_with_embedding:
        # Copies of the LoRA's groups: an optimizer and its LR scheduler write into the group
        # dicts they are given, and phase 2 starts its own from the settings, as a resume does.
        first = Phase("embedding+lora", ti_steps, [dict(g) for g in lora_groups] + [token_group], True, embeddings)
    else:
        # The class captions hold no new token: their gradient would be zero here.
        first = Phase("embedding", ti_steps, [token_group], True, embeddings, uses_prior=False)
    phases = [first, Phase("lora", lora_steps, lora_groups, trains_text_encoder=cfg.train_text_encoder, on_start=embeddings.freeze)]
    optim = optim_config(cfg)
    class_examples = load_class_examples(cfg, parts.resolution) if cfg.prior_loss_weight > 0 else None
    tuner = FineTuner(
        parts, data.examples, phases, optim, class_examples=class_examples, prior_loss_weight=cfg.prior_loss_weight,
        prior_target=cfg.prior_target, contrast_captions=contrast_captions_of(cfg, data.examples), token_contrast_weight=cfg.token_contrast_weight,
        masked_loss=cfg.masked_loss, trainable_modules=modules, embeddings=embeddings, text_prior=text_prior_of(cfg, parts),
    )  # fmt: skip
    tuner.skipped = data.skipped
    return tuner
