"""ONNX Runtime engines: the CPU execution provider here, CUDA / TensorRT providers where present.

Refit, two ways (`refit_mode`):
- "override" (default): weights read by MatMul / Gemm / Gather live in numpy buffers the
  engine owns, handed to the session with `SessionOptions.add_initializer` (initializer
  override); ONNX Runtime reads that memory at every run instead of copying it, once
  prepacking (`session.disable_prepacking`) is off. A refit is one `np.copyto`, exact and
  visible at the next run. Every other weight (convolutions, whose weights the NCHWc
  transformer reorders into private copies; norm weights, which constant folding reshapes)
  is fed as a graph input from the same kind of buffer, bound once per run.
- "inputs": every weight is a graph input (no optimisation can copy it; no prepacking).
The tiny UNet's step: constants 8.9 ms (not refittable), override 10.1 ms, inputs 12.3 ms;
the real-size figures are printed by benchmarks/compiled_engines.py. Both switch in
milliseconds (a memcpy of the changed weights).

On CUDA, initializers are copied to the device, so in-place host writes are not seen; there
the engine rebuilds its session after a refit (slow, but exact) until device-buffer binding
is wired (see `_refit_needs_new_session`).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch

from .base import Component, Engine, EngineInfo, ShapeProfile
from .host_weights import HostWeights
from .manifest import RefitEntry, check_refit_names
from .onnx_weight_file import read_graph, read_weights

BACKEND_NAME = "onnxruntime"
REFIT_MODES = ("override", "inputs")
# Kernels that read these weights from the initializer's memory at every run (with prepacking off).
IN_PLACE_OPS = frozenset({"MatMul", "Gemm", "Gather"})


def _readers(graph) -> dict[str, set[str]]:
    readers: dict[str, set[str]] = {}
    for node in graph.graph.node:
        for name in node.input:
            readers.setdefault(name, set()).add(node.op_type)
    return readers


def available_providers() -> list[str]:
    import onnxruntime as ort

    preferred = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")
    present = ort.get_available_providers()
    return [p for p in preferred if p in present]


def _providers_for(device: str) -> list[str]:
    present = available_providers()
    if device == "cpu":
        return ["CPUExecutionProvider"]
    gpu = [p for p in present if p != "CPUExecutionProvider"]
    if not gpu:
        from .base import BackendUnavailable

        raise BackendUnavailable(f"onnxruntime has no GPU execution provider here (has {', '.join(present)})")
    return gpu + ["CPUExecutionProvider"]


class OnnxRuntimeEngine(Engine):
    def __init__(
        self,
        component: Component,
        onnx_path: Path,
        refit_map: dict[str, RefitEntry],
        precision: str,
        profile: ShapeProfile,
        device: str = "cpu",
        refit_mode: str = "override",
        num_threads: int = 0,
    ):
        import onnxruntime as ort

        if refit_mode not in REFIT_MODES:
            raise ValueError(f"refit_mode must be one of {REFIT_MODES}, not {refit_mode!r}")
        self.component = component
        self.precision = precision
        self.profile = profile
        self.device = device
        self.refit_mode = refit_mode
        self._refit_map = refit_map
        self._providers = _providers_for(device)
        self._num_threads = num_threads
        self._path = Path(onnx_path)
        graph = read_graph(self._path)
        engine_names = [entry.engine_name for entry in refit_map.values()]
        self._weights = read_weights(graph, self._path.parent, engine_names)  # the live weights, by engine name
        self._host = HostWeights(self._weights)
        self._inputs = [i.name for i in graph.graph.input if i.name not in self._weights]
        self._outputs = [o.name for o in graph.graph.output]
        self._ort = ort
        if refit_mode == "override":
            # Only weights read straight from memory by their kernels can be overridden in place;
            # the rest (conv weights that the NCHWc transformer reorders, norm weights that
            # constant folding reshapes) would silently keep their load-time copies, so they
            # are fed as inputs instead. Which ops are safe is tested by refitting every weight.
            readers = _readers(graph)
            self._in_place = {n for n in self._weights if readers.get(n) and readers[n] <= IN_PLACE_OPS}
        else:
            self._in_place = set()
        self._fed = {n: ort.OrtValue.ortvalue_from_numpy(w) for n, w in self._weights.items() if n not in self._in_place}
        self._session = self._make_session(graph)

    def _options(self):
        options = self._ort.SessionOptions()
        options.log_severity_level = 3  # ORT warns about every overridable initializer; not actionable
        options.graph_optimization_level = self._ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if self._num_threads:
            options.intra_op_num_threads = self._num_threads
        return options

    def _make_session(self, graph):
        import onnx

        options = self._options()
        # Without this, MatMul kernels prepack B into private buffers and ignore later writes.
        options.add_session_config_entry("session.disable_prepacking", "1")
        self._override_values = {n: self._ort.OrtValue.ortvalue_from_numpy(self._weights[n]) for n in self._in_place}
        for name, value in self._override_values.items():
            options.add_initializer(name, value)
        # The fed weights become required graph inputs: drop their initializers, declare them as inputs.
        graph = onnx.ModelProto.FromString(graph.SerializeToString())
        kept = [init for init in graph.graph.initializer if init.name not in self._fed]
        for name in self._fed:
            array = self._weights[name]
            graph.graph.input.append(onnx.helper.make_tensor_value_info(name, onnx.helper.np_dtype_to_tensor_dtype(array.dtype), array.shape))
        del graph.graph.initializer[:]
        graph.graph.initializer.extend(kept)
        options.add_session_config_entry("session.model_external_initializers_file_folder_path", str(self._path.parent))
        return self._ort.InferenceSession(graph.SerializeToString(), options, providers=self._providers)

    def _refit_needs_new_session(self) -> bool:
        return self.refit_mode == "override" and self._providers[0] != "CPUExecutionProvider"

    def run(self, inputs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if self._host.finish_restore() and self._refit_needs_new_session():
            self._session = self._make_session(read_graph(self._path))
        missing = [name for name in self._inputs if name not in inputs]
        if missing:
            raise KeyError(f"{self.component.value}: missing inputs {missing}; expects {self._inputs}")
        feed = {name: inputs[name].detach().cpu().numpy() for name in self._inputs}
        if self._fed:
            binding = self._session.io_binding()
            for name, value in feed.items():
                binding.bind_cpu_input(name, np.ascontiguousarray(value))
            for name, value in self._fed.items():
                binding.bind_ortvalue_input(name, value)
            for name in self._outputs:
                binding.bind_output(name)
            self._session.run_with_iobinding(binding)
            outputs = binding.copy_outputs_to_cpu()
        else:
            outputs = self._session.run(self._outputs, feed)
        return {name: torch.from_numpy(np.asarray(value, dtype=np.float32)) for name, value in zip(self._outputs, outputs)}

    def refit(self, named_weights: Mapping[str, torch.Tensor]) -> None:
        check_refit_names(self.component, self._refit_map, named_weights)
        self._host.refit(self._refit_map, named_weights)
        if self._refit_needs_new_session():
            self._session = self._make_session(read_graph(self._path))

    def restore(self) -> None:
        self._host.restore()  # lazy: see host_weights.py

    def info(self) -> EngineInfo:
        return EngineInfo(self.component, BACKEND_NAME, self.precision, self.device, self.profile)


def load_engines(folder: Path, manifest, device: str = "cpu", refit_mode: str = "override") -> dict[Component, Engine]:
    from .manifest import shape_profile

    profile = shape_profile(manifest.profiles, manifest.dynamic_shapes)
    return {
        component: OnnxRuntimeEngine(component, folder / artifact.files[0], artifact.refit, manifest.precision,
                                     profile, device, refit_mode)
        for component, artifact in manifest.components.items()
    }
