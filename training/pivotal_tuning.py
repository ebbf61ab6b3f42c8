"""Pivotal tuning (cloneofsimo's lora_pti): textual inversion first, then LoRA with the new token
held fixed, saved as one adapter holding both the LoRA modules and the token's vectors.

    config -> base weights -> the token -> dataset -> LoRA layers (B = 0, so inert in phase 1)
           -> phase 1: token rows only -> phase 2: LoRA only -> one adapter

Finding the token first gives the LoRA a "pivot" in the text space that already points at
the concept, so the LoRA needs to move the UNet less (and forgets less).
"""

from __future__ import annotations

from dataclasses import dataclass

from .core import BaseComponents, FineTuner, OptimConfig, Phase, load_components
from .lora_trainer import LoraTrainConfig, add_lora
from .textual_inversion import add_token, load_token_dataset


@dataclass
class PivotalTuningConfig(LoraTrainConfig):
    initializer_token: str = ""
    num_vectors: int = 1
    embedding_steps: int = 0  # 0: half of num_steps
    embedding_lr: float = 5e-2

    def validate(self) -> None:
        super().validate()
        if not self.token or not self.initializer_token:
            raise ValueError("pivotal tuning needs token and initializer_token")

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
    phases = [
        # No weight decay on the vectors, as in textual inversion: it pulls them toward zero.
        Phase("embedding", ti_steps, [{"params": embeddings.parameters(), "lr": cfg.embedding_lr, "weight_decay": 0.0}], True, embeddings),
        Phase("lora", lora_steps, lora_groups, trains_text_encoder=cfg.train_text_encoder, on_start=embeddings.freeze),
    ]
    optim = OptimConfig(batch_size=cfg.batch_size, warmup_steps=cfg.warmup_steps, snr_gamma=cfg.snr_gamma, seed=cfg.seed)
    tuner = FineTuner(parts, data.examples, phases, optim, masked_loss=cfg.masked_loss, trainable_modules=modules, embeddings=embeddings)
    tuner.skipped = data.skipped
    return tuner
