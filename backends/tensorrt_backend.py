"""TensorRT engines (NVIDIA GPUs): refittable plans with one optimisation profile per shape profile.

Refit goes through `trt.Refitter`: set the named weights (engine names from the refit map),
then `refit_cuda_engine()`. TensorRT validates that every weight it needs is set, so a refit
names only the weights that change; `restore()` refits the base values back, which it keeps
host-side for every weight ever refitted. The same weights give the same engine bits, so A,
B, A gives A exactly.

This file cannot run on a machine without an NVIDIA GPU; its tests skip there with the reason
from `availability.backend_status("tensorrt")`.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch

from .base import Component, Engine, EngineInfo, ShapeProfile
from .manifest import RefitEntry, check_refit_names

BACKEND_NAME = "tensorrt"


class TensorRTEngine(Engine):
    def __init__(self, component: Component, plan_path: Path, refit_map: dict[str, RefitEntry], precision: str,
                 profile: ShapeProfile, device: str = "cuda"):
        import tensorrt as trt

        self._trt = trt
        self.component = component
        self.precision = precision
        self.profile = profile
        self.device = device if device.startswith("cuda") else "cuda"
        self._refit_map = refit_map
        self._logger = trt.Logger(trt.Logger.WARNING)
        runtime = trt.Runtime(self._logger)
        self._engine = runtime.deserialize_cuda_engine(Path(plan_path).read_bytes())
        if self._engine is None:
            raise RuntimeError(f"{plan_path}: TensorRT could not deserialize the plan (built by another version or GPU?)")
        self._context = self._engine.create_execution_context()
        names = [self._engine.get_tensor_name(i) for i in range(self._engine.num_io_tensors)]
        self._inputs = [n for n in names if self._engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self._outputs = [n for n in names if self._engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        self._stream = torch.cuda.Stream(device=self.device)
        self._active_profile = 0
        self._base: dict[str, np.ndarray] = {}
        self._current: dict[str, np.ndarray] = {}  # the refitted values; TensorRT reads them during refit

    def _profile_index(self, shapes: dict[str, tuple[int, ...]]) -> int:
        for index in range(self._engine.num_optimization_profiles):
            fits = True
            for name, shape in shapes.items():
                lo, _, hi = self._engine.get_tensor_profile_shape(name, index)
                if len(shape) != len(lo) or any(s < a or s > b for s, a, b in zip(shape, lo, hi)):
                    fits = False
                    break
            if fits:
                return index
        raise ValueError(f"{self.component.value}: no optimisation profile takes inputs {shapes}")

    def run(self, inputs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        trt = self._trt
        shapes = {name: tuple(inputs[name].shape) for name in self._inputs}
        index = self._profile_index(shapes)
        with torch.cuda.stream(self._stream):
            if index != self._active_profile:
                self._context.set_optimization_profile_async(index, self._stream.cuda_stream)
                self._active_profile = index
            device_inputs = {}
            for name in self._inputs:
                dtype = torch.from_numpy(np.empty(0, dtype=trt.nptype(self._engine.get_tensor_dtype(name)))).dtype
                device_inputs[name] = inputs[name].to(self.device, dtype).contiguous()
                self._context.set_input_shape(name, shapes[name])
                self._context.set_tensor_address(name, device_inputs[name].data_ptr())
            outputs = {}
            for name in self._outputs:
                dtype = torch.from_numpy(np.empty(0, dtype=trt.nptype(self._engine.get_tensor_dtype(name)))).dtype
                outputs[name] = torch.empty(tuple(self._context.get_tensor_shape(name)), dtype=dtype, device=self.device)
                self._context.set_tensor_address(name, outputs[name].data_ptr())
            if not self._context.execute_async_v3(self._stream.cuda_stream):
                raise RuntimeError(f"{self.component.value}: TensorRT execution failed")
        self._stream.synchronize()
        return {name: value.float().cpu() for name, value in outputs.items()}

    def _refit_engine(self, arrays: dict[str, np.ndarray]) -> None:
        trt = self._trt
        refitter = trt.Refitter(self._engine, self._logger)
        for engine_name, array in arrays.items():
            if not refitter.set_named_weights(engine_name, trt.Weights(array)):
                raise KeyError(f"{self.component.value}: TensorRT refused weight {engine_name}")
        missing = refitter.get_missing_weights()
        if missing:
            raise RuntimeError(f"{self.component.value}: TensorRT needs these weights set together: {', '.join(missing[:10])}")
        if not refitter.refit_cuda_engine():
            raise RuntimeError(f"{self.component.value}: TensorRT refit failed")

    def refit(self, named_weights: Mapping[str, torch.Tensor]) -> None:
        check_refit_names(self.component, self._refit_map, named_weights)
        arrays = {self._refit_map[name].engine_name: self._refit_map[name].to_engine(name, value) for name, value in named_weights.items()}
        for engine_name in arrays:
            if engine_name not in self._base:
                self._base[engine_name] = self._original(engine_name)
        self._current.update(arrays)
        self._refit_engine(arrays)

    def _original(self, engine_name: str) -> np.ndarray:
        # The plan holds the base weights; read them back once, before the first refit of each.
        refitter = self._trt.Refitter(self._engine, self._logger)
        weights = refitter.get_named_weights(engine_name)
        return np.array(weights.numpy(), copy=True)

    def restore(self) -> None:
        if self._base:
            self._refit_engine(dict(self._base))
            self._current.clear()

    def info(self) -> EngineInfo:
        return EngineInfo(self.component, BACKEND_NAME, self.precision, self.device, self.profile)


def load_engines(folder: Path, manifest, device: str = "cuda") -> dict[Component, Engine]:
    from .manifest import shape_profile

    engines = {}
    for component, artifact in manifest.components.items():
        profile = shape_profile(manifest.profiles, manifest.dynamic_shapes)
        if component is Component.TEXT_ENCODER:
            profile = ShapeProfile(profile.min_batch, profile.max_batch, None)
        engines[component] = TensorRTEngine(component, folder / artifact.files[0], artifact.refit, manifest.precision, profile, device)
    return engines
