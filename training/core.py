"""The small core every trainer shares: base weights, cached latents, LoRA injection, new tokens,
and `FineTuner`, the one training step (with prior preservation, the token contrast and masked
loss), in phases.

A trainer (lora.py, dreambooth.py, textual_inversion.py, pivotal_tuning.py) reads top to bottom:
its config dataclass, then what it makes trainable, then the phases it runs. Everything here is
what they would otherwise copy.

The base model is loaded from its folder into a fresh copy, so a server that trains beside
serving never touches the weights its engines run. Only the LoRA matrices and the new token
rows ever get gradients; the rest is frozen.

Steps are driven from outside (`FineTuner.train_step()`), one at a time, so a job can yield to
serving, checkpoint and stop between any two of them. `state_dict()` holds exactly what a
resumed run needs to continue bit for bit: trainable tensors, optimizer and LR-scheduler state,
the random generator and the step.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from impasto.lora import CanonicalAdapter, LoraModule, canonical_target

from .data import Example
from .diffusion_loss import diffusion_loss, noisy_latents_and_target, sample_timesteps, training_noise_scheduler

UNET_ATTENTION_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
UNET_CONV_TARGETS = ("conv1", "conv2")  # LoCon: the ResNet blocks' convolutions
TEXT_ENCODER_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")
ADAPTER_NAME = "default"  # peft's adapter slot in the training copy
PRIOR_TARGETS = ("noise", "base_model")


# --- base weights ------------------------------------------------------------------------------


@dataclass
class BaseComponents:
    """A training copy of a diffusers SD folder: frozen, in eval mode, on the CPU."""

    tokenizer: object
    text_encoder: nn.Module
    unet: nn.Module
    vae: nn.Module
    scheduler_config: dict
    resolution: int  # the model's default image size in pixels

    @property
    def noise_scheduler(self):
        return training_noise_scheduler(self.scheduler_config)


def load_components(model_dir: str | Path) -> BaseComponents:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    model_dir = Path(model_dir)
    parts = BaseComponents(
        tokenizer=CLIPTokenizer.from_pretrained(model_dir / "tokenizer"),
        text_encoder=CLIPTextModel.from_pretrained(model_dir / "text_encoder"),
        unet=UNet2DConditionModel.from_pretrained(model_dir / "unet"),
        vae=AutoencoderKL.from_pretrained(model_dir / "vae"),
        scheduler_config=json.loads((model_dir / "scheduler" / "scheduler_config.json").read_text()),
        resolution=0,
    )
    for module in (parts.text_encoder, parts.unet, parts.vae):
        module.requires_grad_(False)
        module.eval()
    scale = 2 ** (len(parts.vae.config.block_out_channels) - 1)
    sample = parts.unet.config.sample_size
    parts.resolution = (sample if isinstance(sample, int) else sample[0]) * scale
    return parts


# --- latents, cached ---------------------------------------------------------------------------


class CachedLatents:
    """The VAE runs once per image; every step draws a fresh sample of its posterior (as SD does).

    Images of several sizes (aspect buckets from `impasto prep --crop bucket`) are kept in one
    group per size; a batch is drawn from one group, so it stacks.
    """

    def __init__(self, vae, examples: list[Example]):
        self.scaling = float(vae.config.scaling_factor)
        self.groups: list[list[int]] = []  # example indices per image size
        by_size: dict[tuple[int, ...], list[int]] = {}
        for i, e in enumerate(examples):
            by_size.setdefault(tuple(e.pixels.shape), []).append(i)
        self.mean: list[torch.Tensor] = [None] * len(examples)
        self.std: list[torch.Tensor] = [None] * len(examples)
        self.masks: list[torch.Tensor] | None = [None] * len(examples) if all(e.mask is not None for e in examples) else None
        for indices in by_size.values():
            with torch.no_grad():
                dist = vae.encode(torch.stack([examples[i].pixels for i in indices])).latent_dist
            for k, i in enumerate(indices):
                self.mean[i], self.std[i] = dist.mean[k], dist.std[k]
                if self.masks is not None:
                    size = tuple(dist.mean.shape[-2:])
                    self.masks[i] = nn.functional.interpolate(examples[i].mask[None], size=size, mode="area")[0]
            self.groups.append(indices)
        self._group_of = {i: g for g, indices in enumerate(self.groups) for i in indices}

    def __len__(self) -> int:
        return len(self.mean)

    def draw(self, batch_size: int, generator: torch.Generator) -> list[int]:
        """`batch_size` example indices of one size: the size of a random example, then uniform in it."""
        if len(self.groups) == 1:
            group = self.groups[0]
        else:
            group = self.groups[self._group_of[int(torch.randint(0, len(self), (1,), generator=generator))]]
        picks = torch.randint(0, len(group), (batch_size,), generator=generator).tolist()
        return [group[k] for k in picks]

    def sample(self, idx: list[int], generator: torch.Generator) -> torch.Tensor:
        mean = torch.stack([self.mean[i] for i in idx])
        std = torch.stack([self.std[i] for i in idx])
        noise = torch.randn(mean.shape, generator=generator)
        return (mean + std * noise) * self.scaling

    def mask_batch(self, idx: list[int]) -> torch.Tensor:
        return torch.stack([self.masks[i] for i in idx])


# --- LoRA ----------------------------------------------------------------------------------------


def inject_lora(module: nn.Module, targets: tuple[str, ...], rank: int, alpha: float, seed: int = 0) -> list[nn.Parameter]:
    """peft's LoRA layers on every module whose name ends with one of `targets`; returns their
    parameters (B starts at zero, so the model is unchanged until the first step; A is drawn
    from `seed`, so a run is a function of its config)."""
    from peft import LoraConfig, inject_adapter_in_model

    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(targets), init_lora_weights=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        inject_adapter_in_model(config, module, adapter_name=ADAPTER_NAME)
    params = [p for n, p in module.named_parameters() if "lora_" in n]
    if not params:
        raise ValueError(f"no module matched the LoRA targets {targets}")
    for p in params:
        p.requires_grad_(True)
    return params


def lora_modules(module: nn.Module, component: str) -> dict[str, LoraModule]:
    """The canonical {target: LoraModule} of a peft-injected module (copies, detached)."""
    from peft.tuners.lora import LoraLayer

    out = {}
    for name, layer in module.named_modules():
        if isinstance(layer, LoraLayer) and ADAPTER_NAME in layer.lora_A:
            rank = layer.r[ADAPTER_NAME]
            alpha = float(layer.scaling[ADAPTER_NAME]) * rank  # scaling = lora_alpha / r
            down = layer.lora_A[ADAPTER_NAME].weight.detach().clone()
            up = layer.lora_B[ADAPTER_NAME].weight.detach().clone()
            out[canonical_target(component, name)] = LoraModule(down=down, up=up, alpha=alpha)
    return out


def lora_state(module: nn.Module, prefix: str) -> dict[str, torch.Tensor]:
    return {f"{prefix}.{n}": p.detach().clone() for n, p in module.named_parameters() if "lora_" in n}


def load_lora_state(module: nn.Module, prefix: str, state: dict[str, torch.Tensor]) -> None:
    params = dict(module.named_parameters())
    with torch.no_grad():
        for key, value in state.items():
            if key.startswith(prefix + "."):
                params[key[len(prefix) + 1 :]].copy_(value)


# --- new tokens (textual inversion) ---------------------------------------------------------------


class TokenEmbeddings:
    """New token(s) in the tokenizer and rows in the text encoder's token table.

    `token` with `num_vectors` n is written in prompts as `token`; it stands for n tokens
    (`token`, `token_1`, ... `token_{n-1}`), as diffusers' `load_textual_inversion` expands it.
    Only these rows train: their gradient is all the optimizer sees, and after every step the
    other rows are put back exactly (weight decay would otherwise move them).
    """

    def __init__(self, tokenizer, text_encoder, token: str, initializer_token: str, num_vectors: int = 1):
        if num_vectors < 1:
            raise ValueError(f"num_vectors must be >= 1, got {num_vectors}")
        self.token, self.tokenizer, self.text_encoder = token, tokenizer, text_encoder
        self.tokens = [token] + [f"{token}_{i}" for i in range(1, num_vectors)]
        vocab = tokenizer.get_vocab()
        known = [t for t in self.tokens if t in vocab or f"{t}</w>" in vocab]  # CLIP's BPE marks word ends
        added = 0 if known else tokenizer.add_tokens(self.tokens)
        if known or added != len(self.tokens):
            raise ValueError(f"token {token!r} is already in the tokenizer; choose a new word such as '<{token.strip('<>')}-new>'")
        init_ids = tokenizer.encode(initializer_token, add_special_tokens=False)
        if len(init_ids) != 1:
            raise ValueError(f"initializer_token {initializer_token!r} must be one token of the tokenizer, got {len(init_ids)}")
        self.ids = tokenizer.convert_tokens_to_ids(self.tokens)
        text_encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)  # rows set below
        table = self.table
        with torch.no_grad():
            for i in self.ids:
                table.weight[i] = table.weight[init_ids[0]]
        self._frozen = table.weight.detach().clone()
        self._keep = torch.ones(len(tokenizer), dtype=torch.bool)
        self._keep[self.ids] = False

    @property
    def table(self) -> nn.Embedding:
        return self.text_encoder.get_input_embeddings()

    def parameters(self) -> list[nn.Parameter]:
        self.table.weight.requires_grad_(True)
        return [self.table.weight]

    def freeze(self) -> None:
        self.table.weight.requires_grad_(False)

    def expand(self, prompt: str) -> str:
        return prompt.replace(self.token, " ".join(self.tokens)) if len(self.tokens) > 1 else prompt

    def mask_grad(self) -> None:
        grad = self.table.weight.grad
        if grad is not None:
            grad[self._keep] = 0

    def restore_others(self) -> None:
        with torch.no_grad():
            self.table.weight[self._keep] = self._frozen[self._keep]

    def vectors(self) -> torch.Tensor:
        return self.table.weight[self.ids].detach().clone()

    def load_vectors(self, vectors: torch.Tensor) -> None:
        with torch.no_grad():
            self.table.weight[self.ids] = vectors


def add_saved_embeddings(tokenizer, text_encoder, embeddings: dict[str, dict[str, torch.Tensor]]) -> dict[str, str]:
    """Load an adapter's textual-inversion vectors into a (copy of a) model; returns
    {token: the expanded text to write in its place}."""
    expanded = {}
    for token, per in embeddings.items():
        vectors = per["text_encoder"]
        new = TokenEmbeddings(tokenizer, text_encoder, token, initializer_token=",", num_vectors=len(vectors))
        new.load_vectors(vectors)
        expanded[token] = " ".join(new.tokens)
    return expanded


def token_ids(tokenizer, prompts: list[str]) -> torch.Tensor:
    """Prompts as the text encoder reads them in training: padded to its full length, as SD was
    trained (the UNet attends to the padding too)."""
    return tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt").input_ids


@contextmanager
def adapters_off(*modules: nn.Module):
    """The base model's behaviour for a moment: every peft layer in `modules` bypassed, and each
    LoRA parameter's requires_grad as it was afterwards (peft's enable_adapters(True) would turn
    them all on, frozen phases included)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [m for module in modules for m in module.modules() if isinstance(m, BaseTunerLayer)]
    flags = [(p, p.requires_grad) for layer in layers for p in layer.parameters()]
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield
    finally:
        for layer in layers:
            layer.enable_adapters(True)
        for p, flag in flags:
            p.requires_grad_(flag)


# --- the training step ---------------------------------------------------------------------------


@dataclass
class Phase:
    """A run of steps with one set of trainable parameters and learning rates."""

    name: str
    num_steps: int
    param_groups: list[dict]  # torch optimizer groups: {"params": [...], "lr": x}
    trains_text_encoder: bool  # text-encoder LoRA or token rows: encode captions with gradients
    embeddings: TokenEmbeddings | None = None  # rows to keep to themselves in this phase
    on_start: Callable[[], None] | None = None
    # Class images and the token contrast in this phase's batches (when the tuner has them).
    # Pivotal tuning's embedding phase leaves them out: their captions hold no new token, so
    # they would double the step's cost for a gradient of zero.
    uses_prior: bool = True


@dataclass
class StepResult:
    step: int
    loss: float
    learning_rate: float
    phase: str
    seconds: float


# Learning-rate schedules by diffusers' names (its training scripts' --lr_scheduler). After the
# warmup, "constant" stays flat; "cosine" and "linear" fall to zero at the end of each phase, so
# where a run ends does not depend on where a flat rate happened to leave it.
LR_SCHEDULERS = ("constant", "cosine", "linear")


def lr_scheduler_for(optimizer: torch.optim.Optimizer, name: str, warmup: int, num_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    if name == "constant":
        # Warmup from the first step (diffusers' constant_with_warmup starts at a rate of 0).
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / (warmup + 1)))
    from diffusers.optimization import get_scheduler

    return get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=num_steps)


@dataclass
class OptimConfig:
    batch_size: int = 4
    warmup_steps: int = 10
    lr_scheduler: str = "constant"  # one of LR_SCHEDULERS
    weight_decay: float = 1e-2
    grad_clip: float = 1.0
    snr_gamma: float | None = 5.0
    seed: int = 0

    def __post_init__(self) -> None:
        # Checked here, when a trainer is built, not at the first phase after minutes of set-up.
        if self.lr_scheduler not in LR_SCHEDULERS:
            raise ValueError(f"lr_scheduler must be one of {', '.join(LR_SCHEDULERS)}, got {self.lr_scheduler!r}")


class FineTuner:
    """Runs phases of denoising-loss steps on instance images, plus class images when given.

    Prior preservation (DreamBooth): every step adds a batch of class images with the class
    prompt; loss = instance loss + prior_loss_weight × class loss, as diffusers'
    train_dreambooth_lora.py computes it. Masked loss: the squared error is weighted by the
    image's mask at latent resolution.

    Token contrast (ours; `token_contrast_weight` > 0): every step also reads the instance
    batch's own noisy latents with its captions stripped of the token ("a red sks shape" ->
    "a red shape") and holds those predictions to the base model's (the adapters off). The same
    input then asks for the instance with the token and for the base model's image without it,
    so what the adapter learns can only be carried by the token. Why: class images hold the
    prompts they were drawn with, but the adapter's change still spreads to every prompt near
    the instance captions; the contrast ties it to the one word that differs. On the embedded
    shapes model it is what let DreamBooth-LoRA learn the held-out star without redrawing the
    other shapes as stars (benchmarks/training_efficacy.py).
    """

    def __init__(
        self,
        parts: BaseComponents,
        instance: list[Example],
        phases: list[Phase],
        optim: OptimConfig,
        *,
        class_examples: list[Example] | None = None,
        prior_loss_weight: float = 0.0,
        masked_loss: bool = False,
        trainable_modules: dict[str, nn.Module] | None = None,
        embeddings: TokenEmbeddings | None = None,
        text_prior=None,  # text_prior.TextPrior: added to the loss in phases that train the text encoder
        prior_target: str = "noise",  # PRIOR_TARGETS
        contrast_captions: list[str] | None = None,  # the instance captions without the token, one per example
        token_contrast_weight: float = 0.0,
    ):
        if not phases or any(p.num_steps < 0 for p in phases):
            raise ValueError("a run needs at least one phase with steps >= 0")
        self.parts, self.phases, self.optim = parts, phases, optim
        self.noise_scheduler = parts.noise_scheduler
        self.instance = CachedLatents(parts.vae, instance)
        self.instance_captions = [e.caption for e in instance]
        self.masked_loss = masked_loss
        if masked_loss and self.instance.masks is None:
            raise ValueError("masked_loss needs a mask for every image (impasto prep --masks)")
        self.classes = CachedLatents(parts.vae, class_examples) if class_examples and prior_loss_weight > 0 else None
        self.class_captions = [e.caption for e in class_examples or []]
        self.prior_loss_weight = prior_loss_weight
        if prior_target not in PRIOR_TARGETS:
            raise ValueError(f"prior_target must be one of {', '.join(PRIOR_TARGETS)}, got {prior_target!r}")
        self.prior_target = prior_target
        if token_contrast_weight < 0:
            raise ValueError(f"token_contrast_weight must be >= 0, got {token_contrast_weight}")
        if token_contrast_weight > 0:
            if contrast_captions is None or len(contrast_captions) != len(instance):
                raise ValueError("the token contrast needs each instance caption without the token")
            same = [e.source or e.caption for e, c in zip(instance, contrast_captions) if c == e.caption]
            if same:
                # Its two halves would ask one prompt for the instance and for the base model's image.
                raise ValueError(f"the token contrast needs the token in every instance caption; these have none: {', '.join(same[:5])}")
        self.contrast_captions = list(contrast_captions or [])
        self.token_contrast_weight = token_contrast_weight
        self.trainable_modules = trainable_modules or {}
        self.embeddings = embeddings
        self.text_prior = text_prior
        self._holds_text_prior = False
        self.generator = torch.Generator().manual_seed(optim.seed)
        self.step = 0  # steps done, over all phases
        self.running_loss: float | None = None
        self._phase_index = -1
        self._text_cache: dict[str, torch.Tensor] = {}
        self._started = time.monotonic()
        self._steps_this_session = 0

    # --- progress ------------------------------------------------------------------------
    @property
    def num_steps(self) -> int:
        return sum(p.num_steps for p in self.phases)

    @property
    def done(self) -> bool:
        return self.step >= self.num_steps

    def eta_seconds(self) -> float:
        if not self._steps_this_session:
            return 0.0
        per_step = (time.monotonic() - self._started) / self._steps_this_session
        return per_step * (self.num_steps - self.step)

    def _phase_at(self, step: int) -> int:
        end = 0
        for i, p in enumerate(self.phases):
            end += p.num_steps
            if step < end:
                return i
        return len(self.phases) - 1

    def _phase_start(self, index: int) -> int:
        return sum(p.num_steps for p in self.phases[:index])

    def _enter_phase(self, index: int) -> None:
        phase = self.phases[index]
        for p in (q for group in (ph.param_groups for ph in self.phases) for g in group for q in g["params"]):
            p.requires_grad_(False)
        for g in phase.param_groups:
            for p in g["params"]:
                p.requires_grad_(True)
        if phase.on_start:
            phase.on_start()
        self.optimizer = torch.optim.AdamW(phase.param_groups, weight_decay=self.optim.weight_decay)
        warmup = min(self.optim.warmup_steps, max(phase.num_steps // 10, 0))
        self.lr_scheduler = lr_scheduler_for(self.optimizer, self.optim.lr_scheduler, warmup, phase.num_steps)
        self._text_cache.clear()  # a new phase may have changed the text encoder's output
        self._phase_index = index
        # The text prior only steers the text encoder's own weights: a phase that trains only
        # the token's rows (or only the UNet) gets no gradient from it, so it is not computed.
        encoder = self.trainable_modules.get("text_encoder")
        encoder_params = {id(p) for p in encoder.parameters()} if encoder is not None else set()
        self._holds_text_prior = self.text_prior is not None and any(id(p) in encoder_params for g in phase.param_groups for p in g["params"])
        for module in self.trainable_modules.values():
            module.train()

    # --- one step --------------------------------------------------------------------------
    def _encode(self, captions: list[str], with_grad: bool) -> torch.Tensor:
        tok = self.parts.tokenizer
        if self.embeddings is not None:
            captions = [self.embeddings.expand(c) for c in captions]
        if with_grad:
            return self.parts.text_encoder(token_ids(tok, captions))[0]
        missing = [c for c in dict.fromkeys(captions) if c not in self._text_cache]
        if missing:
            ids = token_ids(tok, missing)
            with torch.no_grad():
                out = self.parts.text_encoder(ids)[0]
            self._text_cache.update(zip(missing, out))
        return torch.stack([self._text_cache[c] for c in captions])

    def train_step(self) -> StepResult:
        if self.done:
            raise RuntimeError("training is done")
        t0 = time.perf_counter()
        index = self._phase_at(self.step)
        if index != self._phase_index:
            self._enter_phase(index)
        phase = self.phases[index]
        gen, bs = self.generator, self.optim.batch_size

        idx = self.instance.draw(bs, gen)
        latents = self.instance.sample(idx, gen)
        captions = [self.instance_captions[i] for i in idx]
        if self.classes is not None and phase.uses_prior:
            # One UNet call for both halves needs one latent size: class images of the
            # instance batch's size (they are made at the model's size; buckets train alone).
            cidx = self.classes.draw(bs, gen)
            class_latents = self.classes.sample(cidx, gen)
            if class_latents.shape[-2:] == latents.shape[-2:]:
                latents = torch.cat([latents, class_latents])
                captions += [self.class_captions[i] for i in cidx]
        noise = torch.randn(latents.shape, generator=gen)
        timesteps = sample_timesteps(self.noise_scheduler, len(latents), gen)
        noisy, target = noisy_latents_and_target(self.noise_scheduler, latents, noise, timesteps)
        n_class = len(latents) - bs
        n_contrast = bs if self.token_contrast_weight > 0 and phase.uses_prior else 0
        if n_contrast:
            # The token contrast: the instance half's very noisy latents and timesteps again,
            # read with the captions stripped of the token, held to the base model's prediction.
            noisy, timesteps = torch.cat([noisy, noisy[:bs]]), torch.cat([timesteps, timesteps[:bs]])
            captions += [self.contrast_captions[i] for i in idx]
        context = self._encode(captions, phase.trains_text_encoder)
        pred = self.parts.unet(noisy, timesteps, context).sample
        # Rows [0, noise_rows) keep the added noise as their target; the rest (the class half with
        # prior_target "base_model", then the contrast rows) are held to the base model's prediction.
        noise_rows = bs if self.prior_target == "base_model" else bs + n_class
        if len(noisy) > noise_rows:
            rest = slice(noise_rows, None)
            target = torch.cat([target[:noise_rows], self._base_prediction(noisy[rest], timesteps[rest], captions[rest], context[rest])])

        loss = self._loss(pred[:bs], target[:bs], timesteps[:bs], self.instance.mask_batch(idx) if self.masked_loss else None)
        if n_class:
            rows = slice(bs, bs + n_class)
            loss = loss + self.prior_loss_weight * self._loss(pred[rows], target[rows], timesteps[rows], None)
        if n_contrast:
            rows = slice(bs + n_class, None)
            loss = loss + self.token_contrast_weight * self._loss(pred[rows], target[rows], timesteps[rows], None)
        if self._holds_text_prior:
            loss = loss + self.text_prior.loss(self.parts.text_encoder)

        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if phase.embeddings is not None:
            phase.embeddings.mask_grad()
        params = [p for g in phase.param_groups for p in g["params"]]
        torch.nn.utils.clip_grad_norm_(params, self.optim.grad_clip)
        self.optimizer.step()
        self.lr_scheduler.step()
        if phase.embeddings is not None:
            phase.embeddings.restore_others()

        value = float(loss.detach())
        if not math.isfinite(value):
            raise FloatingPointError(f"loss is {value} at step {self.step + 1}; lower the learning rate")
        self.running_loss = value if self.running_loss is None else 0.9 * self.running_loss + 0.1 * value
        self.step += 1
        self._steps_this_session += 1
        lr = self.optimizer.param_groups[0]["lr"]
        return StepResult(self.step, value, lr, phase.name, time.perf_counter() - t0)

    def _base_prediction(self, noisy: torch.Tensor, timesteps: torch.Tensor, captions: list[str], context: torch.Tensor) -> torch.Tensor:
        """What the base model predicts for the rows held to it (the class half with prior_target
        "base_model", the token contrast's rows): the adapters off, no gradient. `context` is
        those captions' encoding this step; it is the base model's unless the text encoder has a
        LoRA (new token rows never touch these captions, which hold no token), and then they are
        encoded again without it."""
        with torch.no_grad(), adapters_off(self.parts.unet, self.parts.text_encoder):
            if "text_encoder" in self.trainable_modules:
                context = self.parts.text_encoder(token_ids(self.parts.tokenizer, captions))[0]
            return self.parts.unet(noisy, timesteps, context.detach()).sample

    def _loss(self, pred, target, timesteps, masks) -> torch.Tensor:
        if masks is None:
            return diffusion_loss(self.noise_scheduler, pred, target, timesteps, self.optim.snr_gamma)
        # The same Min-SNR weighting as diffusion_loss, over the masked squared error.
        from diffusers.training_utils import compute_snr

        err = (pred.float() - target.float()) ** 2 * masks
        per_sample = err.sum(dim=(1, 2, 3)) / (masks.sum(dim=(1, 2, 3)) * pred.shape[1]).clamp(min=1e-6)
        if self.optim.snr_gamma is None:
            return per_sample.mean()
        snr = compute_snr(self.noise_scheduler, timesteps)
        weight = torch.clamp(snr, max=self.optim.snr_gamma) / snr
        return (per_sample * weight).mean()

    # --- checkpoints -----------------------------------------------------------------------
    def state_dict(self) -> dict:
        trainable = {}
        for prefix, module in self.trainable_modules.items():
            trainable.update(lora_state(module, prefix))
        state = {
            "step": self.step,
            "phase_index": self._phase_index,
            "trainable": trainable,
            "generator": self.generator.get_state(),
            "running_loss": self.running_loss if self.running_loss is not None else float("nan"),
        }
        if self.embeddings is not None:
            state["embeddings"] = self.embeddings.vectors()
        if self._phase_index >= 0:
            state["optimizer"] = self.optimizer.state_dict()
            state["lr_scheduler"] = self.lr_scheduler.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        for prefix, module in self.trainable_modules.items():
            load_lora_state(module, prefix, state["trainable"])
        if self.embeddings is not None and "embeddings" in state:
            self.embeddings.load_vectors(state["embeddings"])
        self.generator.set_state(state["generator"])
        self.step = int(state["step"])
        loss = float(state["running_loss"])
        self.running_loss = None if math.isnan(loss) else loss
        if state["phase_index"] >= 0 and not self.done:
            index = int(state["phase_index"])
            self._enter_phase(index)
            if self._phase_at(self.step) == index:
                self.optimizer.load_state_dict(state["optimizer"])
                self.lr_scheduler.load_state_dict(state["lr_scheduler"])

    # --- results ---------------------------------------------------------------------------
    def adapter(self, metadata: dict[str, str] | None = None) -> CanonicalAdapter:
        modules = {}
        for component, module in self.trainable_modules.items():
            modules.update(lora_modules(module, component))
        embeddings = {}
        if self.embeddings is not None:
            embeddings[self.embeddings.token] = {"text_encoder": self.embeddings.vectors()}
        return CanonicalAdapter(modules=modules, embeddings=embeddings, metadata=dict(metadata or {}), source_format="impasto-training")

    @torch.no_grad()
    def sample(self, prompts: list[str], seed: int = 0, num_inference_steps: int = 20, guidance_scale: float = 7.5) -> list:
        """Images from the training copy (PIL), one per prompt, seeds seed, seed+1, ..."""
        for module in self.trainable_modules.values():
            module.eval()
        try:
            return sample_images(self.parts, prompts, seed, num_inference_steps, guidance_scale, self.embeddings)
        finally:
            for module in self.trainable_modules.values():
                module.train()


def sample_images(
    parts: BaseComponents, prompts, seed=0, num_inference_steps=20, guidance_scale=7.5, embeddings: TokenEmbeddings | None = None,
    sampler: str = "euler_a", seeds: list[int] | None = None,
):
    """A diffusers pipeline over the training copy's modules (no weights copied). Image i has
    seed `seeds[i]`, or seed + i."""
    from diffusers import EulerAncestralDiscreteScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline(
        vae=parts.vae,
        text_encoder=parts.text_encoder,
        tokenizer=parts.tokenizer,
        unet=parts.unet,
        scheduler=EulerAncestralDiscreteScheduler.from_config(parts.scheduler_config),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    if embeddings is not None:
        prompts = [embeddings.expand(p) for p in prompts]
    if seeds is not None and len(seeds) != len(prompts):
        raise ValueError(f"{len(seeds)} seeds for {len(prompts)} prompts")
    generators = [torch.Generator().manual_seed(s) for s in (seeds if seeds is not None else range(seed, seed + len(prompts)))]
    return pipe(
        list(prompts),
        height=parts.resolution,
        width=parts.resolution,
        num_inference_steps=num_inference_steps,
        guidance_scale=guidance_scale,
        generator=generators,
    ).images


@dataclass
class TrainingSummary:
    steps: int
    seconds: float
    final_loss: float
    losses: list[float] = field(default_factory=list)


def run_to_end(tuner: FineTuner, log: Callable[[StepResult], None] | None = None) -> TrainingSummary:
    """Train to the last step in this process (scripts and benchmarks; jobs step one at a time)."""
    t0, losses = time.perf_counter(), []
    while not tuner.done:
        result = tuner.train_step()
        losses.append(result.loss)
        if log:
            log(result)
    return TrainingSummary(tuner.step, time.perf_counter() - t0, tuner.running_loss or float("nan"), losses)
