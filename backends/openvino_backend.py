"""OpenVINO engines on the CPU: one static-shape compiled model per profile.

Static shapes matter on SD (OpenVINO's own SD notebooks reshape before compiling): with
every dimension known, the CPU plugin picks its convolution and attention kernels once, at
compile time. The graph keeps dynamic dimensions; the engine reshapes a copy of it to each
profile's size (batch fixed when the profile's range is one number, else a bounded range)
and compiles that.

Refit, two ways (`refit_mode`):
- "parameters" (default): every refittable weight is turned into a model input
  (`ov.op.Parameter`) fed from a buffer the engine owns, bound once per infer request with
  shared memory. A refit is one `np.copyto` per weight, exact and visible at the next run.
- "recompile": weights stay `Constant`s (so the plugin can repack them at compile time);
  a refit replaces those Constant nodes and recompiles every profile. Exact, slow to switch.
benchmarks/compiled_engines.py measures both (step latency and switch time).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch

from .base import Component, Engine, EngineInfo, ShapeProfile
from .host_weights import HostWeights
from .manifest import Profile, RefitEntry, check_refit_names

BACKEND_NAME = "openvino"
REFIT_MODES = ("parameters", "recompile")
PRECISION_HINTS = {"fp32": "f32", "bf16": "bf16", "fp16": "f16", "int8": "bf16"}
TEXT_LENGTH = 77


def _static_shapes(component: Component, model, profile: Profile, vae_scale: int) -> dict[str, object]:
    """Input name -> partial shape for one profile (sizes in image pixels)."""
    import openvino as ov

    batch = ov.Dimension(profile.min_batch) if profile.min_batch == profile.max_batch else ov.Dimension(profile.min_batch, profile.max_batch)
    shapes = {}
    for port in model.inputs:
        name = port.get_any_name()
        dims = list(port.get_partial_shape())
        if name in ("sample", "latent"):
            dims = [batch, dims[1], ov.Dimension(profile.height // vae_scale), ov.Dimension(profile.width // vae_scale)]
        elif name == "image":
            dims = [batch, dims[1], ov.Dimension(profile.height), ov.Dimension(profile.width)]
        elif name == "timestep":
            dims = [batch]
        elif name in ("encoder_hidden_states", "input_ids"):
            dims = [batch] + dims[1:]
        else:
            continue  # a weight input
        shapes[name] = ov.PartialShape(dims)
    return shapes


def _profile_fits(component: Component, profile: Profile, inputs: Mapping[str, torch.Tensor], vae_scale: int) -> bool:
    first = next(iter(inputs.values()))
    batch = first.shape[0]
    if not profile.min_batch <= batch <= profile.max_batch:
        return False
    if component is Component.TEXT_ENCODER:
        return True
    spatial = first.shape[-2:]
    scale = 1 if component is Component.VAE_ENCODER else vae_scale
    return tuple(spatial) == (profile.height // scale, profile.width // scale)


class OpenVINOEngine(Engine):
    def __init__(
        self,
        component: Component,
        model_path: Path,
        refit_map: dict[str, RefitEntry],
        precision: str,
        profiles: list[Profile],
        shape_profile: ShapeProfile,
        inference_precision: str = "f32",
        vae_scale: int = 8,
        refit_mode: str = "parameters",
        num_threads: int = 0,
    ):
        import openvino as ov

        if refit_mode not in REFIT_MODES:
            raise ValueError(f"refit_mode must be one of {REFIT_MODES}, not {refit_mode!r}")
        self.component = component
        self.precision = precision
        self.refit_mode = refit_mode
        self.profile = shape_profile
        self._vae_scale = vae_scale
        self._ov = ov
        self._core = ov.Core()
        self._config = {"INFERENCE_PRECISION_HINT": inference_precision, "PERFORMANCE_HINT": "LATENCY"}
        if num_threads:
            self._config["INFERENCE_NUM_THREADS"] = num_threads
        self._refit_map = refit_map
        # A text encoder has no spatial size: one compiled model per distinct batch range.
        if component is Component.TEXT_ENCODER:
            profiles = list({(p.min_batch, p.max_batch): Profile(0, 0, p.min_batch, p.max_batch) for p in profiles}.values())
        self._profiles = profiles
        self._model = self._core.read_model(str(model_path))
        self._outputs = [port.get_any_name() for port in self._model.outputs]
        engine_names = {entry.engine_name for entry in refit_map.values()}
        self._constants = {op.get_friendly_name(): op for op in self._model.get_ops()
                           if op.get_type_name() == "Constant" and op.get_friendly_name() in engine_names}
        missing = engine_names - self._constants.keys()
        if missing:
            raise ValueError(f"{model_path}: refit map names weights the IR does not have: {', '.join(sorted(missing)[:10])}")
        self._base: dict[str, object] = {}  # recompile mode: engine name -> the base Constant node
        if refit_mode == "parameters":
            self._host = HostWeights(self._weights_to_parameters())
        self._compile()

    def _weights_to_parameters(self) -> dict[str, np.ndarray]:
        ov = self._ov
        weights, parameters = {}, []
        for name, constant in self._constants.items():
            weights[name] = np.array(constant.get_data(), copy=True)  # owned, writable
            parameter = ov.op.Parameter(constant.get_output_element_type(0), constant.get_output_partial_shape(0))
            parameter.set_friendly_name(name)
            parameter.output(0).set_names({name})
            constant.output(0).replace(parameter.output(0))
            parameters.append(parameter)
        self._model.add_parameters(parameters)
        self._constants = {}
        return weights

    def _compile(self) -> None:
        self._requests = []
        for profile in self._profiles:
            model = self._model.clone()
            model.reshape(_static_shapes(self.component, model, profile, self._vae_scale))
            request = self._core.compile_model(model, "CPU", self._config).create_infer_request()
            if self.refit_mode == "parameters":
                for name, array in self._host.arrays.items():
                    request.set_tensor(name, self._ov.Tensor(array, shared_memory=True))
            self._requests.append((profile, request))

    def _request_for(self, inputs: Mapping[str, torch.Tensor]):
        for profile, request in self._requests:
            if _profile_fits(self.component, profile, inputs, self._vae_scale):
                return request
        shapes = {name: tuple(value.shape) for name, value in inputs.items()}
        built = ", ".join(p.describe() for p, _ in self._requests)
        raise ValueError(f"{self.component.value}: no compiled profile takes inputs {shapes} (built: {built})")

    def run(self, inputs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if self.refit_mode == "parameters":
            self._host.finish_restore()
        request = self._request_for(inputs)
        for name, value in inputs.items():
            request.set_tensor(name, self._ov.Tensor(np.ascontiguousarray(value.detach().cpu().numpy())))
        request.infer()
        return {name: torch.from_numpy(np.array(request.get_tensor(name).data, dtype=np.float32, copy=True)) for name in self._outputs}

    def refit(self, named_weights: Mapping[str, torch.Tensor]) -> None:
        check_refit_names(self.component, self._refit_map, named_weights)
        if self.refit_mode == "parameters":
            self._host.refit(self._refit_map, named_weights)
            return
        arrays = {self._refit_map[name].engine_name: self._refit_map[name].to_engine(name, value) for name, value in named_weights.items()}
        for engine_name, array in arrays.items():
            self._replace_constant(engine_name, self._ov.op.Constant(array))
        self._compile()

    def _replace_constant(self, engine_name: str, new_constant) -> None:
        old = self._constants[engine_name]
        self._base.setdefault(engine_name, old)
        new_constant.set_friendly_name(engine_name)
        old.output(0).replace(new_constant.output(0))
        self._constants[engine_name] = new_constant

    def restore(self) -> None:
        if self.refit_mode == "parameters":
            self._host.restore()  # lazy, as in the onnxruntime engine: see host_weights.py
            return
        if not self._base:
            return
        for engine_name, base in list(self._base.items()):
            self._replace_constant(engine_name, base)
        self._base.clear()
        self._compile()

    def accepts(self, batch: int, width: int, height: int) -> bool:
        """Exact: some compiled profile takes this batch at this image size."""
        for profile, _ in self._requests:
            if profile.min_batch <= batch <= profile.max_batch and (
                self.component is Component.TEXT_ENCODER or (profile.width, profile.height) == (width, height)
            ):
                return True
        return False

    def info(self) -> EngineInfo:
        return EngineInfo(self.component, BACKEND_NAME, self.precision, "cpu", self.profile)


def load_engines(folder: Path, manifest, device: str = "cpu", refit_mode: str = "parameters") -> dict[Component, Engine]:
    from .manifest import shape_profile

    if device != "cpu":
        from .base import BackendUnavailable

        raise BackendUnavailable(f"openvino engines here run on the CPU only, not {device}")
    hint = manifest.options.get("inference_precision", "f32")
    engines = {}
    for component, artifact in manifest.components.items():
        profile = shape_profile(manifest.profiles, manifest.dynamic_shapes)
        if component is Component.TEXT_ENCODER:
            profile = ShapeProfile(profile.min_batch, profile.max_batch, None)
        engines[component] = OpenVINOEngine(component, folder / artifact.files[0], artifact.refit, manifest.precision,
                                            manifest.profiles, profile, hint, manifest.vae_scale_factor, refit_mode)
    return engines
