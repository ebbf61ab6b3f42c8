"""A job's request (`TrainingSpec`, plain data) -> the trainer that runs it (impasto.training).

The one place that knows each method's defaults and which spec fields it reads. Servicers and
the job manager never see a trainer config; trainers never see a spec.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from .errors import InvalidArgument

METHODS = ("lora", "dreambooth_lora", "textual_inversion", "pivotal_tuning")
PRIOR_METHODS = ("dreambooth_lora", "pivotal_tuning")  # the methods that take class images (prior preservation)
DEFAULT_STEPS = {"lora": 300, "dreambooth_lora": 300, "textual_inversion": 500, "pivotal_tuning": 400}
MAX_STEPS = 100_000
MAX_BATCH = 64
MAX_RANK = 256
MAX_TEXT_PRIOR_PROMPTS = 1024  # each is a text-encoder pass per step
MAX_CLASS_PROMPTS = 1024  # each needs at least one class image, generated before the job starts
MAX_CLASS_IMAGES = 10_000


@dataclass(frozen=True)
class TrainingSpec:
    """What a client asked for. 0 / None / "" means the method's default."""

    method: str
    dataset: str
    adapter_name: str
    model: str = ""
    instance_prompt: str = ""
    num_steps: int = 0
    batch_size: int = 0
    seed: int | None = None
    checkpoint_every: int = 0
    sample_every: int = 0
    sample_prompts: tuple[str, ...] = ()
    masked_loss: bool = False
    gradient_checkpointing: bool = False
    lr_scheduler: str = ""  # "": the method's (constant; cosine for textual inversion)
    # LoRA
    rank: int = 0
    alpha: float | None = None
    train_text_encoder: bool = False
    conv: bool = False
    unet_lr: float | None = None
    text_encoder_lr: float | None = None
    text_encoder_only: bool = False
    text_prior_prompts: tuple[str, ...] = ()
    text_prior_weight: float | None = None
    # DreamBooth
    class_prompt: str = ""
    extra_class_prompts: tuple[str, ...] = ()
    num_class_images: int = 0
    prior_loss_weight: float | None = None
    prior_target: str = ""  # "": the trainer's default (noise)
    token_contrast_weight: float | None = None  # None: off
    # textual inversion / pivotal tuning
    token: str = ""
    initializer_token: str = ""
    num_vectors: int = 0
    embedding_lr: float | None = None
    embedding_steps: int = 0
    train_lora_with_embedding: bool = False

    def to_json(self) -> dict:
        d = asdict(self)
        d["sample_prompts"] = list(self.sample_prompts)
        d["text_prior_prompts"] = list(self.text_prior_prompts)
        d["extra_class_prompts"] = list(self.extra_class_prompts)
        return d

    @classmethod
    def from_json(cls, d: dict) -> "TrainingSpec":
        known = {f.name for f in fields(cls)}
        d = {k: v for k, v in d.items() if k in known}
        d["sample_prompts"] = tuple(d.get("sample_prompts", ()))
        d["text_prior_prompts"] = tuple(d.get("text_prior_prompts", ()))
        d["extra_class_prompts"] = tuple(d.get("extra_class_prompts", ()))
        return cls(**d)

    @property
    def resolved_steps(self) -> int:
        return self.num_steps or DEFAULT_STEPS[self.method]

    @property
    def uses_prior_preservation(self) -> bool:
        return self.method in PRIOR_METHODS and self.has_class_prompts and (self.prior_loss_weight is None or self.prior_loss_weight > 0)

    @property
    def has_class_prompts(self) -> bool:
        return bool(self.class_prompt or self.extra_class_prompts)

    def sample_prompt_list(self) -> list[str]:
        prompts = list(self.sample_prompts) or [self.instance_prompt]
        return [p.replace("{token}", self.token) for p in prompts if p]


def validate_spec(spec: TrainingSpec) -> None:
    """The checks that need nothing but the spec; each error names its field."""
    if spec.method not in METHODS:
        raise InvalidArgument("method", f"must be one of {', '.join(METHODS)}")
    if not 0 <= spec.num_steps <= MAX_STEPS:
        raise InvalidArgument("num_steps", f"must be at most {MAX_STEPS}")
    if not 0 <= spec.batch_size <= MAX_BATCH:
        raise InvalidArgument("batch_size", f"must be at most {MAX_BATCH}")
    if not 0 <= spec.rank <= MAX_RANK:
        raise InvalidArgument("lora.rank", f"must be at most {MAX_RANK}")
    if spec.alpha is not None and spec.alpha <= 0:
        raise InvalidArgument("lora.alpha", "must be positive")
    from impasto.training.core import LR_SCHEDULERS

    if spec.lr_scheduler and spec.lr_scheduler not in LR_SCHEDULERS:
        raise InvalidArgument("lr_scheduler", f"must be one of {', '.join(LR_SCHEDULERS)}, got {spec.lr_scheduler!r}")
    for name in ("unet_lr", "text_encoder_lr", "embedding_lr"):
        value = getattr(spec, name)
        if value is not None and not 0 < value < 1:
            raise InvalidArgument(name, f"must be in (0, 1), got {value}")
    if spec.method == "textual_inversion":
        if spec.text_encoder_only:
            raise InvalidArgument("lora.text_encoder_only", "textual inversion trains no LoRA")
        if spec.text_prior_prompts:
            raise InvalidArgument("lora.text_prior_prompts", "textual inversion changes no other prompt's encoding")
    if spec.text_encoder_only and not spec.train_text_encoder:
        raise InvalidArgument("lora.text_encoder_only", "needs lora.train_text_encoder: the LoRA must go somewhere")
    if spec.text_prior_prompts and not spec.train_text_encoder:
        raise InvalidArgument("lora.text_prior_prompts", "need lora.train_text_encoder: they hold what the text encoder's LoRA changes")
    if len(spec.text_prior_prompts) > MAX_TEXT_PRIOR_PROMPTS:
        raise InvalidArgument("lora.text_prior_prompts", f"at most {MAX_TEXT_PRIOR_PROMPTS}")
    if spec.token and any(spec.token in p for p in spec.text_prior_prompts):
        raise InvalidArgument("lora.text_prior_prompts", f"must not contain the new token {spec.token!r}: they are what it must leave alone")
    if spec.text_prior_weight is not None and spec.text_prior_weight <= 0:
        raise InvalidArgument("lora.text_prior_weight", "must be > 0")
    if spec.prior_loss_weight is not None and spec.prior_loss_weight < 0:
        raise InvalidArgument("dreambooth.prior_loss_weight", "must be >= 0")
    from impasto.training.core import PRIOR_TARGETS

    if spec.prior_target and spec.prior_target not in PRIOR_TARGETS:
        raise InvalidArgument("dreambooth.prior_target", f"must be one of {', '.join(PRIOR_TARGETS)}, got {spec.prior_target!r}")
    if spec.prior_target and not spec.uses_prior_preservation:
        raise InvalidArgument("dreambooth.prior_target", "only acts with prior preservation on (a class prompt, prior_loss_weight > 0)")
    _validate_class_prompts(spec)
    if spec.token_contrast_weight is not None:
        field = "dreambooth.token_contrast_weight"
        if spec.method not in PRIOR_METHODS:
            raise InvalidArgument(field, f"only {' and '.join(PRIOR_METHODS)} bind an instance token")
        if spec.token_contrast_weight < 0:
            raise InvalidArgument(field, f"must be >= 0, got {spec.token_contrast_weight}")
        if spec.token_contrast_weight > 0 and not spec.token:
            raise InvalidArgument(field, "needs the instance token (textual_inversion.token, e.g. 'sks'), to take it out of the captions")
    if spec.method == "dreambooth_lora" and not spec.instance_prompt:
        raise InvalidArgument("instance_prompt", "DreamBooth needs the prompt that binds the instance, e.g. 'a sks shape'")
    if spec.method in ("textual_inversion", "pivotal_tuning"):
        if not spec.token:
            raise InvalidArgument("textual_inversion.token", "name the new token, e.g. '<pink>'")
        if not spec.initializer_token:
            raise InvalidArgument("textual_inversion.initializer_token", "name an existing word to start from, e.g. 'red'")
        if spec.method == "pivotal_tuning" and spec.embedding_steps >= spec.resolved_steps:
            raise InvalidArgument("textual_inversion.embedding_steps", f"must be below num_steps ({spec.resolved_steps})")
    if spec.train_lora_with_embedding and spec.method != "pivotal_tuning":
        raise InvalidArgument("textual_inversion.train_lora_with_embedding", "only pivotal tuning trains a LoRA beside the token")
    if spec.masked_loss and spec.method not in METHODS:
        raise InvalidArgument("masked_loss", "not supported by this method")


def _validate_class_prompts(spec: TrainingSpec) -> None:
    field = "dreambooth.extra_class_prompts"
    if spec.extra_class_prompts and spec.method not in PRIOR_METHODS:
        raise InvalidArgument(field, f"only {' and '.join(PRIOR_METHODS)} take class images")
    if len(spec.extra_class_prompts) > MAX_CLASS_PROMPTS:
        raise InvalidArgument(field, f"at most {MAX_CLASS_PROMPTS}, got {len(spec.extra_class_prompts)}")
    for i, prompt in enumerate(spec.extra_class_prompts):
        if not prompt.strip():
            raise InvalidArgument(f"{field}[{i}]", "is empty")
        if "[filewords]" in prompt:
            raise InvalidArgument(f"{field}[{i}]", "[filewords] belongs in dreambooth.class_prompt")
        if spec.token and spec.token in prompt.split():
            raise InvalidArgument(f"{field}[{i}]", f"must not contain the instance token {spec.token!r}: the class prompts are what it must leave alone")
    if spec.num_class_images > MAX_CLASS_IMAGES:
        raise InvalidArgument("dreambooth.num_class_images", f"at most {MAX_CLASS_IMAGES}")
    from impasto.training.dreambooth import distinct_prompts

    # Counted as the trainer counts them. A "[filewords]" class prompt becomes one per caption,
    # which only the trainer can count (it refuses too few images itself).
    n_prompts = len(distinct_prompts([p for p in (spec.class_prompt, *spec.extra_class_prompts) if p]))
    if spec.num_class_images and spec.num_class_images < n_prompts:
        raise InvalidArgument("dreambooth.num_class_images", f"{spec.num_class_images} is fewer than the {n_prompts} class prompts; each needs an image")


def _prior_fields(spec: TrainingSpec, job_dir: Path) -> dict:
    """DreamBooth's class fields (dreambooth.DreamBoothConfig, pivotal_tuning.PivotalTuningConfig)."""
    return dict(
        class_prompt=spec.class_prompt,
        extra_class_prompts=tuple(spec.extra_class_prompts),
        class_dir=str(job_dir / "class_images"),
        num_class_images=spec.num_class_images,  # 0: the trainer's default (50, or one per class prompt)
        prior_loss_weight=(spec.prior_loss_weight if spec.prior_loss_weight is not None else 1.0) if spec.has_class_prompts else 0.0,
        prior_target=spec.prior_target or "noise",
        token_contrast_weight=spec.token_contrast_weight or 0.0,
    )


def _ensure_class_images(cfg, class_images) -> None:
    from impasto.training import dreambooth

    if cfg.prior_loss_weight > 0:
        if class_images is None:
            raise RuntimeError("prior preservation needs a class-image generator")
        dreambooth.ensure_class_images(cfg, class_images)


def _lora_fields(spec: TrainingSpec, seed: int) -> dict:
    out = dict(
        num_steps=spec.resolved_steps,
        batch_size=spec.batch_size or 4,
        seed=seed,
        rank=spec.rank or 4,
        alpha=spec.alpha,
        train_text_encoder=spec.train_text_encoder,
        conv=spec.conv,
        gradient_checkpointing=spec.gradient_checkpointing,
        masked_loss=spec.masked_loss,
        token=spec.token,
    )
    if spec.lr_scheduler:
        out["lr_scheduler"] = spec.lr_scheduler
    if spec.unet_lr is not None:
        out["unet_lr"] = spec.unet_lr
    if spec.text_encoder_lr is not None:
        out["text_encoder_lr"] = spec.text_encoder_lr
    out["unet_lora"] = not spec.text_encoder_only
    if spec.text_prior_prompts:
        out["text_prior_prompts"] = tuple(spec.text_prior_prompts)
        out["text_prior_weight"] = spec.text_prior_weight if spec.text_prior_weight is not None else 1.0
    return out


def build_trainer(
    spec: TrainingSpec,
    *,
    seed: int,
    model_dir: Path,
    dataset_dir: Path,
    job_dir: Path,
    class_images: Callable[[list[tuple[str, int]]], list] | None = None,  # dreambooth.ClassImageGenerator
    parts=None,
):
    """The FineTuner for a spec. DreamBooth's class images are made first (only the missing ones)."""
    from impasto.training import dreambooth, lora_trainer, pivotal_tuning, textual_inversion

    base = dict(model_dir=str(model_dir), dataset=str(dataset_dir), instance_prompt=spec.instance_prompt)
    if spec.method == "lora":
        return lora_trainer.build(lora_trainer.LoraTrainConfig(**base, **_lora_fields(spec, seed)), parts)
    if spec.method == "dreambooth_lora":
        cfg = dreambooth.DreamBoothConfig(**base, **_lora_fields(spec, seed), **_prior_fields(spec, job_dir))
        _ensure_class_images(cfg, class_images)
        return dreambooth.build(cfg, parts)
    if spec.method == "textual_inversion":
        cfg = textual_inversion.TextualInversionConfig(
            **{k: v for k, v in base.items() if k != "instance_prompt"},
            instance_prompt=spec.instance_prompt or "a {token} shape",
            token=spec.token,
            initializer_token=spec.initializer_token,
            num_vectors=spec.num_vectors or 1,
            num_steps=spec.resolved_steps,
            batch_size=spec.batch_size or 4,
            seed=seed,
            masked_loss=spec.masked_loss,
        )
        if spec.embedding_lr is not None:
            cfg.learning_rate = spec.embedding_lr
        if spec.lr_scheduler:
            cfg.lr_scheduler = spec.lr_scheduler
        return textual_inversion.build(cfg, parts)
    if spec.method == "pivotal_tuning":
        cfg = pivotal_tuning.PivotalTuningConfig(
            **{**base, "instance_prompt": spec.instance_prompt or "a {token} shape"},
            **_lora_fields(spec, seed),
            initializer_token=spec.initializer_token,
            num_vectors=spec.num_vectors or 1,
            embedding_steps=spec.embedding_steps,
            train_lora_with_embedding=spec.train_lora_with_embedding,
            **_prior_fields(spec, job_dir),
        )
        if spec.embedding_lr is not None:
            cfg.embedding_lr = spec.embedding_lr
        _ensure_class_images(cfg, class_images)
        return pivotal_tuning.build(cfg, parts)
    raise InvalidArgument("method", f"must be one of {', '.join(METHODS)}")
