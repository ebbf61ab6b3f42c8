"""Find and load the engine folders the compiler wrote, refusing any that do not match.

A folder is used whole or not at all: its manifest must name this model's hash and the
installed backend's exact version, and every file it lists must be there; otherwise
`ManifestMismatch` says why and the server falls back to torch (DESIGN.md, The compiler).
"""

from __future__ import annotations

from pathlib import Path

from .availability import backend_status
from .base import BackendUnavailable, Component, ModelEngines
from .manifest import MANIFEST_FILE, Manifest
from .model_folder import cached_model_hash


class ManifestMismatch(RuntimeError):
    """An engine folder that must not be used with this model or this installation; the message says why."""

    def __init__(self, folder: Path, reason: str):
        super().__init__(f"{folder}: {reason}")
        self.folder = folder
        self.reason = reason


def _backend_module(backend: str):
    if backend == "onnxruntime":
        from . import onnxruntime_backend as module
    elif backend == "openvino":
        from . import openvino_backend as module
    elif backend == "tensorrt":
        from . import tensorrt_backend as module
    else:
        raise ValueError(f"no compiled backend named {backend!r}")
    return module


def find_engine_folders(engines_dir: Path, model_hash: str) -> list[tuple[str, Path]]:
    """(backend, folder) for every complete engine folder built from `model_hash`, by name.

    Unreadable manifests and half-written (hidden, temporary) folders are skipped here;
    `load_engine_folder` is where a mismatch is explained.
    """
    engines_dir = Path(engines_dir)
    if not engines_dir.is_dir():
        return []
    found = []
    for folder in sorted(engines_dir.iterdir()):
        if folder.name.startswith(".") or not (folder / MANIFEST_FILE).is_file():
            continue
        try:
            manifest = Manifest.read(folder)
        except (ValueError, KeyError, TypeError):
            continue
        if manifest.model_hash == model_hash:
            found.append((manifest.backend, folder))
    return found


def read_checked_manifest(folder: Path, model_dir: Path) -> Manifest:
    """The folder's manifest, if it matches the model and the installed backend; else ManifestMismatch."""
    folder = Path(folder)
    try:
        manifest = Manifest.read(folder)
    except FileNotFoundError:
        raise ManifestMismatch(folder, f"no {MANIFEST_FILE}") from None
    except (ValueError, KeyError, TypeError) as exc:
        raise ManifestMismatch(folder, f"unreadable manifest: {exc}") from None
    model_hash = cached_model_hash(Path(model_dir)).sha256
    if manifest.model_hash != model_hash:
        raise ManifestMismatch(folder, f"built from model {manifest.model_hash[:10]}, but the model is {model_hash[:10]}")
    status = backend_status(manifest.backend)
    if not status.available:
        raise BackendUnavailable(f"{folder}: {manifest.backend} cannot run here: {status.reason}")
    if manifest.backend_version != status.version:
        raise ManifestMismatch(folder, f"built with {manifest.backend} {manifest.backend_version}, installed is {status.version}")
    for component, artifact in manifest.components.items():
        for name in artifact.files:
            if not (folder / name).is_file():
                raise ManifestMismatch(folder, f"{component.value}: missing file {name}")
    for required in (Component.TEXT_ENCODER, Component.UNET, Component.VAE_DECODER):
        if required not in manifest.components:
            raise ManifestMismatch(folder, f"no {required.value} engine")
    return manifest


def load_engine_folder(path: Path, model_dir: Path, device: str = "cpu", **engine_options) -> ModelEngines:
    """Load every engine of a matching folder; raises ManifestMismatch (or BackendUnavailable) otherwise.

    `engine_options` go to the backend's engines (e.g. `refit_mode`), for measurements.
    """
    manifest = read_checked_manifest(Path(path), Path(model_dir))
    engines = _backend_module(manifest.backend).load_engines(Path(path), manifest, device, **engine_options)
    return ModelEngines(
        text_encoder=engines[Component.TEXT_ENCODER],
        unet=engines[Component.UNET],
        vae_decoder=engines[Component.VAE_DECODER],
        vae_encoder=engines.get(Component.VAE_ENCODER),
    )
