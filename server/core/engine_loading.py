"""Assemble a model's engines: compiled engine folders in the server's backend preference
order, each component routed with the model's torch engines as the fallback.

A folder whose manifest does not match the model or the installed backend is refused whole,
with the reason logged and kept for `GetServerInfo`; it is never half-used.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from impasto.backends import torch_backend
from impasto.backends.base import BackendUnavailable, Component, ModelEngines

from .engine_router import RoutedEngine

log = logging.getLogger(__name__)


@dataclass
class EngineLoadReport:
    loaded: list[tuple[str, Path]] = field(default_factory=list)  # (backend, folder)
    refused: list[tuple[Path, str]] = field(default_factory=list)  # (folder, reason)


def load_routed_engines(
    model_dir: Path,
    model_hash: str,
    backends: tuple[str, ...],
    engines_dir: Path | None,
    vae_scale_factor: int,
    on_fallback: Callable[[str], None],
) -> tuple[ModelEngines, EngineLoadReport]:
    torch_engines = torch_backend.load_model(model_dir)
    report = EngineLoadReport()
    compiled: list[ModelEngines] = []
    if engines_dir is not None:
        from impasto.backends.engine_folder import ManifestMismatch, find_engine_folders, load_engine_folder

        found = find_engine_folders(engines_dir, model_hash)
        for backend in backends:
            if backend == "torch":
                break  # torch is the fallback; backends after it would never be picked
            for found_backend, folder in found:
                if found_backend != backend:
                    continue
                try:
                    compiled.append(load_engine_folder(folder, model_dir))
                    report.loaded.append((backend, folder))
                    log.info("model %s: loaded %s engines from %s", model_dir.name, backend, folder)
                except (ManifestMismatch, BackendUnavailable) as exc:
                    report.refused.append((folder, str(exc)))
                    log.warning("refused engine folder: %s", exc)
                except Exception as exc:  # e.g. a runtime that cannot open the graph: refuse the folder, keep serving
                    report.refused.append((folder, f"{type(exc).__name__}: {exc}"))
                    log.exception("could not load engine folder %s; refused", folder)

    def route(component: Component, pick) -> RoutedEngine:
        candidates = [e for e in (pick(m) for m in compiled) if e is not None]
        return RoutedEngine(component, candidates, pick(torch_engines), vae_scale_factor, on_fallback)

    engines = ModelEngines(
        text_encoder=route(Component.TEXT_ENCODER, lambda m: m.text_encoder),
        unet=route(Component.UNET, lambda m: m.unet),
        vae_decoder=route(Component.VAE_DECODER, lambda m: m.vae_decoder),
        vae_encoder=route(Component.VAE_ENCODER, lambda m: m.vae_encoder),
    )
    return engines, report
