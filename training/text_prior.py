"""Prior preservation in the text encoder's output space, for runs that train the text encoder.

DreamBooth's prior preservation (dreambooth.py) holds the UNet's output on class images. When
the concept is taught through the text encoder instead (a LoRA on it, beside the new token's
vectors, with the UNet left as it is), what other prompts draw can only change through their
encodings, so holding those is enough: every step adds

    text_prior_weight x mean squared difference between the encodings of `prompts` now and
    the base text encoder's

the base encodings computed once at the start. Every held prompt is encoded at every step, at
its full 77 positions (the UNet attends to the padding too): the benchmark's 98 prompts took a
step of the shapes model from 63 to 121 ms (one CPU thread, measured 2026-11-27), so hold the
prompts users write, not every variant. None may contain the new token.

Why it is ours: diffusers' scripts preserve the prior only through class images and the UNet
loss. On the embedded shapes model that leaves DreamBooth-LoRA's other shapes at 19-26% (100%
before); pivotal tuning through the text encoder with this prior keeps them at 100%, but the
untouched UNet draws the held-out star well formed only 25% of the time after 150 steps (56% at
step 100; benchmarks/training_efficacy.py, `pivotal_te`, 2026-11-28): the prior holds what is
there, it cannot make the UNet draw what it never learnt. Holding only the 7 class prompts
("a shape", "a red shape", ...) instead, in an experiment that trained the whole text encoder,
left them at 61-79%: the prompts held must cover what users write.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .core import BaseComponents, token_ids


class TextPrior:
    def __init__(self, parts: BaseComponents, prompts: list[str], weight: float):
        if not prompts:
            raise ValueError("a text prior needs prompts to hold")
        if weight <= 0:
            raise ValueError(f"text_prior_weight must be > 0, got {weight}")
        self.weight = weight
        self.prompts = list(prompts)
        self.ids = token_ids(parts.tokenizer, self.prompts)
        with torch.no_grad():
            self.targets = parts.text_encoder(self.ids)[0].detach().clone()

    def loss(self, text_encoder: torch.nn.Module) -> torch.Tensor:
        return self.weight * F.mse_loss(text_encoder(self.ids)[0].float(), self.targets.float())


def text_prior_of(cfg, parts: BaseComponents) -> TextPrior | None:
    """A LoraTrainConfig's text prior (None unless it names prompts), from the base text encoder:
    call it before the run changes the text encoder (a fresh LoRA is inert, so after it is fine)."""
    if not cfg.text_prior_prompts:
        return None
    if cfg.token and any(cfg.token in p for p in cfg.text_prior_prompts):
        raise ValueError(f"text_prior_prompts must not contain the new token {cfg.token!r}: they are what it must leave alone")
    return TextPrior(parts, list(cfg.text_prior_prompts), cfg.text_prior_weight)
