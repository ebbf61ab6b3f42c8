"""Textual inversion: a new token (e.g. "<pink>") whose vectors are learnt from a few images;
nothing else in the model changes.

    config -> base weights -> the token (rows initialised from an existing word) -> dataset
           -> one phase of steps on those rows only -> adapter with `embeddings` only

Captions should use `{token}` ("a {token} circle") or the instance prompt supplies it.
The adapter's embeddings are `{token: {"text_encoder": tensor[num_vectors, dim]}}`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .core import BaseComponents, FineTuner, OptimConfig, Phase, TokenEmbeddings, load_components
from .data import load_dataset


@dataclass
class TextualInversionConfig:
    model_dir: str
    dataset: str
    token: str  # the new word, e.g. "<pink>"
    initializer_token: str  # an existing word to start from, e.g. "red"
    instance_prompt: str = "a {token} shape"
    num_vectors: int = 1
    # The defaults are the steadiest measured on the shipped default model (impasto-shapes-v2,
    # textual inversion of pink, four training seeds each, benchmarks/training_efficacy.py,
    # 2026-11-28): lr 1e-2 on a cosine schedule over 500 steps ended at 84%, 81%, 80%, 81% pink;
    # a constant schedule (diffusers' default) at lr 5e-2 over 300 steps, this file's defaults
    # before, at 92%, 44%, 82%, 81%: one seed in four missed. On v1 neither won everywhere. The
    # tiny model's embeddings are 32 wide; for SD 1.5 (768) diffusers' ~5e-3 is the scale to
    # start from.
    num_steps: int = 500
    batch_size: int = 4
    seed: int = 0
    learning_rate: float = 1e-2
    masked_loss: bool = False
    snr_gamma: float | None = 5.0
    warmup_steps: int = 10
    lr_scheduler: str = "cosine"  # core.LR_SCHEDULERS

    def validate(self) -> None:
        if not self.token or not self.initializer_token:
            raise ValueError("textual inversion needs token and initializer_token")
        if self.num_steps < 1 or self.batch_size < 1:
            raise ValueError("num_steps and batch_size must be >= 1")


def add_token(cfg, parts: BaseComponents) -> TokenEmbeddings:
    return TokenEmbeddings(parts.tokenizer, parts.text_encoder, cfg.token, cfg.initializer_token, cfg.num_vectors)


def load_token_dataset(cfg, parts: BaseComponents):
    """The instance images; every caption must name the token, or the token cannot learn from it."""
    data = load_dataset(
        Path(cfg.dataset), resolution=parts.resolution, default_caption=cfg.instance_prompt, token=cfg.token, want_masks=cfg.masked_loss
    )
    missing = [e.source for e in data.examples if cfg.token not in e.caption]
    if missing:
        raise ValueError(f"captions must use the token {cfg.token!r} (write {{token}}); these do not: {', '.join(missing[:5])}")
    return data


def build(cfg: TextualInversionConfig, parts: BaseComponents | None = None) -> FineTuner:
    cfg.validate()
    parts = parts or load_components(cfg.model_dir)
    embeddings = add_token(cfg, parts)
    data = load_token_dataset(cfg, parts)
    phase = Phase("embedding", cfg.num_steps, [{"params": embeddings.parameters(), "lr": cfg.learning_rate}], True, embeddings)
    optim = OptimConfig(
        batch_size=cfg.batch_size, warmup_steps=cfg.warmup_steps, lr_scheduler=cfg.lr_scheduler, weight_decay=0.0, snr_gamma=cfg.snr_gamma, seed=cfg.seed
    )
    tuner = FineTuner(parts, data.examples, [phase], optim, masked_loss=cfg.masked_loss, embeddings=embeddings)
    tuner.skipped = data.skipped
    return tuner
