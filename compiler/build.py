"""Build one engine folder: export every component, build it for one backend, write the manifest.

The folder's name is a key of everything that determines its contents (model hash, backend,
backend version, precision, profiles, our recipe version), so re-running with the same inputs
finds the folder and reuses it. A build writes into a hidden temporary folder beside it and
renames it into place when complete: a crashed build leaves no half-folder that could load.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from impasto.atomic_files import usual_mode
from impasto.backends.availability import backend_status
from impasto.backends.base import BackendUnavailable, Component
from impasto.backends.manifest import MANIFEST_FILE, SCHEMA_VERSION, ComponentArtifact, Manifest, Profile
from impasto.backends.model_folder import cached_model_hash, check_loadable

# Bump when the export or a build step changes what it writes, so old folders are not reused.
RECIPE_VERSION = 1
BACKENDS = ("onnxruntime", "openvino", "tensorrt")
PRECISIONS = {
    "onnxruntime": ("fp32", "fp16"),
    "openvino": ("fp32", "bf16", "fp16", "int8"),
    "tensorrt": ("fp32", "fp16"),
}
ALL_COMPONENTS = (Component.TEXT_ENCODER, Component.UNET, Component.VAE_DECODER, Component.VAE_ENCODER)


@dataclass(frozen=True)
class BuildRequest:
    model_dir: Path
    backend: str
    out_dir: Path  # the engines directory; the engine folder is created inside it
    precision: str = "fp32"
    profiles: tuple[Profile, ...] = ()  # empty: the model's native size (see profiles.default_profiles)
    components: tuple[Component, ...] = ALL_COMPONENTS


@dataclass
class BuildResult:
    folder: Path
    reused: bool
    seconds: float
    component_seconds: dict[str, float] = field(default_factory=dict)


def folder_name(model_hash: str, backend: str, backend_version: str, precision: str, profiles, components) -> str:
    key = json.dumps(
        [model_hash, backend, backend_version, precision, [p.describe() for p in profiles],
         sorted(c.value for c in components), SCHEMA_VERSION, RECIPE_VERSION]
    )
    return f"{model_hash[:10]}-{backend}-{precision}-{hashlib.sha256(key.encode()).hexdigest()[:12]}"


def _backend_builder(backend: str):
    if backend == "onnxruntime":
        from . import onnxruntime_build as module
    elif backend == "openvino":
        from . import openvino_build as module
    elif backend == "tensorrt":
        from . import tensorrt_build as module
    else:
        raise ValueError(f"unknown backend {backend!r}; known: {', '.join(BACKENDS)}")
    return module


def compile_model(request: BuildRequest, log=print) -> BuildResult:
    """Build (or find) the engine folder for `request`; returns where it is."""
    if request.backend not in BACKENDS:
        raise ValueError(f"unknown backend {request.backend!r}; known: {', '.join(BACKENDS)}")
    if request.precision not in PRECISIONS[request.backend]:
        raise ValueError(f"{request.backend} builds {', '.join(PRECISIONS[request.backend])}, not {request.precision}")
    status = backend_status(request.backend)
    if not status.available:
        raise BackendUnavailable(f"cannot build {request.backend} engines here: {status.reason}")
    model_dir = Path(request.model_dir)
    check_loadable(model_dir)
    started = time.perf_counter()
    model_hash = cached_model_hash(model_dir).sha256
    builder = _backend_builder(request.backend)

    from impasto.backends.torch_backend import load_model

    from .profiles import default_profiles

    from .onnx_export import vae_scale_factor

    torch_engines = load_model(model_dir)
    vae_scale = vae_scale_factor(torch_engines.vae_decoder.module)
    profiles = list(request.profiles) or default_profiles(torch_engines.unet.module.config.sample_size, vae_scale)
    # the UNet halves the latent once per extra level; every level must divide evenly
    multiple = vae_scale * 2 ** (len(torch_engines.unet.module.config.block_out_channels) - 1)
    for profile in profiles:
        if profile.width % multiple or profile.height % multiple:
            raise ValueError(f"profile {profile.describe()}: sizes must be multiples of {multiple} for this model")
    name = folder_name(model_hash, request.backend, status.version, request.precision, profiles, request.components)
    out_dir = Path(request.out_dir)
    final = out_dir / name
    if (final / MANIFEST_FILE).is_file():
        log(f"reusing {final}")
        return BuildResult(final, True, time.perf_counter() - started)

    out_dir.mkdir(parents=True, exist_ok=True)
    # Hidden and on the same filesystem as the final folder, so the rename below is atomic.
    temp = Path(tempfile.mkdtemp(prefix=f".{name}.", suffix=".tmp", dir=out_dir))
    try:
        modules = {
            Component.TEXT_ENCODER: torch_engines.text_encoder.module,
            Component.UNET: torch_engines.unet.module,
            Component.VAE_DECODER: torch_engines.vae_decoder.module,
            Component.VAE_ENCODER: torch_engines.vae_encoder.module,
        }
        artifacts: dict[Component, ComponentArtifact] = {}
        options: dict[str, str] = {}
        component_seconds = {}
        for component in request.components:
            t0 = time.perf_counter()
            log(f"{component.value}: export and build for {request.backend} {request.precision}")
            artifact, component_options = builder.build_component(component, modules[component], temp, request.precision, profiles, vae_scale)
            artifacts[component] = artifact
            options.update(component_options)
            component_seconds[component.value] = time.perf_counter() - t0
        manifest = Manifest(
            model_hash=model_hash,
            backend=request.backend,
            backend_version=status.version,
            precision=request.precision,
            profiles=profiles,
            dynamic_shapes=builder.DYNAMIC_SHAPES,
            vae_scale_factor=vae_scale,
            build_time=datetime.now(timezone.utc).isoformat(timespec="seconds"),
            build_seconds=round(time.perf_counter() - started, 2),
            components=artifacts,
            options=options,
        )
        manifest.write(temp)
        usual_mode(temp)
        try:
            os.rename(temp, final)
        except OSError:
            if not (final / MANIFEST_FILE).is_file():
                raise
            # another build of the same key finished first; its folder is equivalent
            shutil.rmtree(temp, ignore_errors=True)
            return BuildResult(final, True, time.perf_counter() - started, component_seconds)
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        raise
    log(f"built {final} in {time.perf_counter() - started:.1f} s")
    return BuildResult(final, False, time.perf_counter() - started, component_seconds)
