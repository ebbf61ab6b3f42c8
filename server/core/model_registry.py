"""The models a server can serve: the embedded default plus every diffusers folder in a models dir.

Models are found at start-up (cheap: no weights are read except for hashing) and loaded on
first use. A folder that cannot be served (pickle weights, missing parts) is listed with the
reason, so `ListModels` explains why it is not available instead of hiding it.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from impasto.backends.base import ModelEngines
from impasto.backends.model_folder import cached_model_hash, check_loadable

from .engine_loading import EngineLoadReport, load_routed_engines
from .errors import NotFound, Unavailable
from .prompt_encoding import PromptTokenizer

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GenerationDefaults:
    """What an unset request field becomes. A1111's defaults unless a model ships its own."""

    num_steps: int = 20
    guidance_scale: float = 7.0
    sampler: str = "euler_a"


@dataclass
class ModelEntry:
    name: str
    path: Path
    is_default: bool = False
    sha256: str = ""
    available: bool = True
    unavailable_reason: str = ""
    defaults: GenerationDefaults = field(default_factory=GenerationDefaults)
    default_width: int = 0
    default_height: int = 0

    @property
    def short_hash(self) -> str:
        return self.sha256[:10]


@dataclass
class LoadedModel:
    """One model ready to run: its tokenizer, engines and the facts the step loop needs."""

    entry: ModelEntry
    tokenizer: PromptTokenizer
    engines: ModelEngines
    scheduler_config: dict[str, Any]
    latent_channels: int
    vae_scale_factor: int  # pixels per latent cell
    vae_scaling_factor: float  # latents are stored multiplied by this


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text())


def _default_size(model_dir: Path) -> tuple[int, int]:
    unet = _read_json(model_dir / "unet" / "config.json")
    vae = _read_json(model_dir / "vae" / "config.json")
    scale = 2 ** (len(vae.get("block_out_channels", [0])) - 1)
    sample = unet.get("sample_size", 64)
    size = sample * scale if isinstance(sample, int) else sample[0] * scale
    return size, size


def _embedded_default() -> tuple[str, Path, GenerationDefaults] | None:
    try:
        from impasto import models
    except ImportError:
        return None
    path = Path(models.default_model_path())
    defaults = GenerationDefaults()
    recommended = getattr(models, "DEFAULT_SETTINGS", None)
    if recommended is not None:
        defaults = GenerationDefaults(
            num_steps=recommended.num_inference_steps, guidance_scale=recommended.guidance_scale, sampler=recommended.sampler
        )
    return models.DEFAULT_MODEL_NAME, path, defaults


class ModelRegistry:
    def __init__(
        self,
        models_dir: Path | None = None,
        default_model: str = "",
        include_embedded: bool = True,
        *,
        backends: tuple[str, ...] = ("torch",),
        engines_dir: Path | None = None,
        on_fallback: Callable[[str], None] = lambda reason: None,
    ):
        self.models_dir = models_dir
        self.backends = backends
        self.engines_dir = engines_dir
        self.on_fallback = on_fallback
        self.engine_reports: dict[str, EngineLoadReport] = {}
        self._entries: dict[str, ModelEntry] = {}
        self._loaded: dict[str, LoadedModel] = {}
        self._lock = threading.Lock()
        if include_embedded and (embedded := _embedded_default()) is not None:
            name, path, defaults = embedded
            self._add(ModelEntry(name=name, path=path, defaults=defaults))
        if models_dir is not None:
            if not models_dir.is_dir():
                raise FileNotFoundError(f"models dir {models_dir} does not exist")
            for path in sorted(p for p in models_dir.iterdir() if p.is_dir() and not p.name.startswith(".")):
                self._add(ModelEntry(name=path.name, path=path))
        if not self._entries:
            raise FileNotFoundError("no models: the embedded default is missing and no models dir was given")
        servable = [name for name, e in self._entries.items() if e.available]
        default_name = default_model or (servable[0] if servable else next(iter(self._entries)))
        if default_name not in self._entries:
            raise NotFound(f"default model '{default_name}' not found; known: {', '.join(self._entries)}")
        self._entries[default_name].is_default = True
        self.default_name = default_name

    def _add(self, entry: ModelEntry) -> None:
        if entry.name in self._entries:
            log.warning("model %s at %s shadows another of the same name; skipped", entry.name, entry.path)
            return
        try:
            check_loadable(entry.path)
            entry.sha256 = cached_model_hash(entry.path).sha256
            entry.default_width, entry.default_height = _default_size(entry.path)
        except Exception as exc:  # listed as unavailable, with the reason
            entry.available = False
            entry.unavailable_reason = str(exc)
            log.warning("model %s is not servable: %s", entry.name, exc)
        self._entries[entry.name] = entry

    def list(self) -> list[ModelEntry]:
        return list(self._entries.values())

    def resolve(self, name: str) -> ModelEntry:
        """A model by name or by (short) hash; empty means the default."""
        if not name:
            entry = self._entries[self.default_name]
        else:
            entry = self._entries.get(name) or next(
                (e for e in self._entries.values() if e.sha256 and len(name) >= 10 and e.sha256.startswith(name)), None
            )
            if entry is None:
                raise NotFound(f"model: unknown model '{name}'; known: {', '.join(self._entries)}")
        if not entry.available:
            raise Unavailable(f"model '{entry.name}' cannot be served: {entry.unavailable_reason}")
        return entry

    def load(self, name: str) -> LoadedModel:
        entry = self.resolve(name)
        with self._lock:
            if entry.name not in self._loaded:
                self._loaded[entry.name] = self._load(entry)
            return self._loaded[entry.name]

    def loaded(self) -> list[LoadedModel]:
        return list(self._loaded.values())

    def _load(self, entry: ModelEntry) -> LoadedModel:
        from transformers import CLIPTokenizer

        log.info("loading model %s from %s", entry.name, entry.path)
        tokenizer = CLIPTokenizer.from_pretrained(entry.path / "tokenizer")
        vae_config = _read_json(entry.path / "vae" / "config.json")
        engines, report = load_routed_engines(
            entry.path,
            entry.sha256,
            self.backends,
            self.engines_dir,
            2 ** (len(vae_config["block_out_channels"]) - 1),
            self.on_fallback,
        )
        self.engine_reports[entry.name] = report
        unet_config = _read_json(entry.path / "unet" / "config.json")
        return LoadedModel(
            entry=entry,
            tokenizer=PromptTokenizer(tokenizer),
            engines=engines,
            scheduler_config=_read_json(entry.path / "scheduler" / "scheduler_config.json"),
            latent_channels=unet_config.get("in_channels", 4),
            vae_scale_factor=2 ** (len(vae_config["block_out_channels"]) - 1),
            vae_scaling_factor=vae_config.get("scaling_factor", 0.18215),
        )
