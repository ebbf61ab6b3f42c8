"""Server configuration: one dataclass, read from a TOML file and overridden by CLI flags.

Example impasto.toml:

    [server]
    host = "127.0.0.1"
    port = 50051
    models_dir = "/srv/models"
    adapters_dir = "/srv/impasto/adapters"

    [limits]
    max_pixels = 1048576
    max_steps = 150

    [scheduler]
    max_batch_size = 8

    [training]
    checkpoint_every = 50
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Limits:
    max_pixels: int = 1024 * 1024
    max_steps: int = 150
    max_images_per_request: int = 8
    max_queue_length: int = 64
    max_message_bytes: int = 64 * 1024 * 1024
    max_prompt_chars: int = 20_000
    # Largest adapter file UploadAdapter accepts.
    max_adapter_bytes: int = 512 * 1024 * 1024
    # Merged LoRA weights (base + delta per target weight) kept for fast switching, in bytes.
    adapter_cache_bytes: int = 2 * 1024 * 1024 * 1024

    def validate(self) -> None:
        for f in fields(self):
            if getattr(self, f.name) <= 0:
                raise ValueError(f"limits.{f.name} must be positive, got {getattr(self, f.name)}")


@dataclass(frozen=True)
class SchedulerConfig:
    # Images (sequences) whose steps share one UNet call. 1 turns batching off.
    max_batch_size: int = 8
    # How long the loop waits for more requests before starting an idle batch, in ms.
    admission_wait_ms: float = 0.0
    # A waiting request rises one priority level per this many seconds (no starvation).
    priority_aging_s: float = 30.0
    # Images admitted to the running set at once (0: 4 batches' worth). Admitting past one batch
    # lets a short request start while long ones run, instead of waiting at the door.
    max_running_images: int = 0
    # Fast lane: a request of at most this many (denoiser) steps is short. When a short request is
    # the most urgent, long ones join its batch only while the estimated step time stays within
    # fast_lane_max_stretch times that of the short ones alone, so a short request does not pay
    # for full-batch steps (some throughput lost under mixed load). 0 turns the lane off.
    fast_lane_max_steps: int = 8
    fast_lane_max_stretch: float = 1.5
    # torch intra-op threads for the engines (0: torch's default, one per core). On a machine
    # shared with other work, fewer threads avoid oversubscription collapse.
    intra_op_threads: int = 0

    def validate(self) -> None:
        if self.max_batch_size < 1:
            raise ValueError(f"scheduler.max_batch_size must be >= 1, got {self.max_batch_size}")
        if self.admission_wait_ms < 0:
            raise ValueError(f"scheduler.admission_wait_ms must be >= 0, got {self.admission_wait_ms}")
        if self.max_running_images < 0 or self.intra_op_threads < 0:
            raise ValueError("scheduler.max_running_images and scheduler.intra_op_threads must be >= 0")
        if self.priority_aging_s <= 0:
            raise ValueError(f"scheduler.priority_aging_s must be > 0, got {self.priority_aging_s}")
        if self.fast_lane_max_steps < 0:
            raise ValueError(f"scheduler.fast_lane_max_steps must be >= 0, got {self.fast_lane_max_steps}")
        if not self.fast_lane_max_stretch >= 1:
            raise ValueError(f"scheduler.fast_lane_max_stretch must be >= 1, got {self.fast_lane_max_stretch}")


@dataclass(frozen=True)
class TrainingConfig:
    # Jobs that train at once; the others queue (one is the right number on one device).
    max_running_jobs: int = 1
    # A job writes a checkpoint every this many steps unless its request says otherwise.
    checkpoint_every: int = 50
    # Largest dataset UploadDataset accepts, in bytes.
    max_dataset_bytes: int = 256 * 1024 * 1024
    # A training step waits while the step loop has requests, at most this long (then runs one
    # step anyway, so a steady stream of requests cannot starve a job forever).
    max_yield_wait_s: float = 30.0

    def validate(self) -> None:
        for f in fields(self):
            if getattr(self, f.name) <= 0:
                raise ValueError(f"training.{f.name} must be positive, got {getattr(self, f.name)}")


def default_data_dir() -> Path:
    """$IMPASTO_DATA_DIR, else $XDG_DATA_HOME/impasto, else ~/.local/share/impasto."""
    if os.environ.get("IMPASTO_DATA_DIR"):
        return Path(os.environ["IMPASTO_DATA_DIR"])
    return Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share") / "impasto"


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 50051
    # Prometheus /metrics; None: off, 0: a free port.
    metrics_port: int | None = None
    models_dir: Path | None = None
    default_model: str = ""
    include_embedded_model: bool = True
    # Uploaded LoRA adapters live here (by content hash); None: <data dir>/adapters.
    adapters_dir: Path | None = None
    # A1111's embeddings by name: an uploaded adapter that is embeddings alone applies wherever a
    # prompt or negative prompt writes its token, without the request naming it. Off: only the
    # adapters a request names bring tokens (on a server shared by several users, one user's
    # embedding would otherwise fire on a word in another's prompt).
    apply_embeddings_named_in_prompt: bool = True
    # Backend preference order; compiled engines come from engines_dir (impasto compile --out).
    # torch is always the fallback, so backends listed after it are never used.
    backends: tuple[str, ...] = ("torch",)
    engines_dir: Path | None = None
    limits: Limits = field(default_factory=Limits)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    # Datasets (datasets/<name>) and training jobs (training/jobs/<id>); None: default_data_dir().
    data_dir: Path | None = None
    training: TrainingConfig = field(default_factory=TrainingConfig)

    @property
    def resolved_data_dir(self) -> Path:
        return Path(self.data_dir) if self.data_dir is not None else default_data_dir()

    @property
    def resolved_adapters_dir(self) -> Path:
        return Path(self.adapters_dir) if self.adapters_dir is not None else self.resolved_data_dir / "adapters"

    def validate(self) -> "ServerConfig":
        from impasto.backends.availability import BACKEND_NAMES

        unknown = [b for b in self.backends if b not in BACKEND_NAMES]
        if unknown or not self.backends:
            raise ValueError(f"server.backends: unknown {unknown or 'empty list'}; known: {', '.join(BACKEND_NAMES)}")
        if not 0 <= self.port < 65536:
            raise ValueError(f"server.port must be in 0..65535, got {self.port}")
        self.limits.validate()
        self.scheduler.validate()
        self.training.validate()
        return self


def _section(cls, data: dict[str, Any], where: str):
    known = {f.name for f in fields(cls)}
    unknown = set(data) - known
    if unknown:
        raise ValueError(f"{where}: unknown keys {sorted(unknown)}; known: {sorted(known)}")
    return cls(**data)


def load_config(path: Path | None = None, **overrides: Any) -> ServerConfig:
    """Defaults, then the TOML file, then non-None overrides (CLI flags), validated."""
    config = ServerConfig()
    if path is not None:
        data = tomllib.loads(Path(path).read_text())
        unknown = set(data) - {"server", "limits", "scheduler", "training"}
        if unknown:
            raise ValueError(f"{path}: unknown sections {sorted(unknown)}")
        server = dict(data.get("server", {}))
        if "backends" in server:
            server["backends"] = tuple(server["backends"])
        for key in ("models_dir", "adapters_dir", "engines_dir", "data_dir"):
            if key in server:
                server[key] = Path(server[key])
        config = replace(
            _section(ServerConfig, server, f"{path} [server]"),
            limits=_section(Limits, data.get("limits", {}), f"{path} [limits]"),
            scheduler=_section(SchedulerConfig, data.get("scheduler", {}), f"{path} [scheduler]"),
            training=_section(TrainingConfig, data.get("training", {}), f"{path} [training]"),
        )
    limit_overrides = {k: v for k, v in overrides.items() if k in {f.name for f in fields(Limits)} and v is not None}
    sched_overrides = {k: v for k, v in overrides.items() if k in {f.name for f in fields(SchedulerConfig)} and v is not None}
    training_overrides = {k: v for k, v in overrides.items() if k in {f.name for f in fields(TrainingConfig)} and v is not None}
    top = {k: v for k, v in overrides.items() if k in {f.name for f in fields(ServerConfig)} and v is not None}
    config = replace(
        config,
        **top,
        limits=replace(config.limits, **limit_overrides),
        scheduler=replace(config.scheduler, **sched_overrides),
        training=replace(config.training, **training_overrides),
    )
    return config.validate()
