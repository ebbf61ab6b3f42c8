"""OpenVINO build step: the named ONNX graph for OpenVINO's ONNX frontend, or an int8 IR (NNCF).

The graph keeps dynamic dimensions; the engine reshapes it to each profile and compiles static
shapes at load (`backends/openvino_backend.py`). OpenVINO's ONNX frontend names each weight
Constant after its initializer, so the refit map's engine names (= torch names) carry over.

Precisions: `fp32` and `bf16` share the fp32 IR and differ in the CPU plugin's inference
precision hint (bf16 runs on AVX512-BF16 / AMX); `fp16` asks for f16 compute (only where the
CPU has it); `int8` compresses MatMul / Conv / embedding weights to
int8 with NNCF (per output channel, symmetric) and computes in bf16 where available. The
int8-compressed weights are no longer plain Constants, so they leave the refit map: refit on
an int8 engine only reaches the weights that stayed fp32 (norms, biases).
"""

from __future__ import annotations

from pathlib import Path

from impasto.backends.base import Component
from impasto.backends.manifest import ComponentArtifact, Profile, RefitEntry

from .onnx_export import export_named

DYNAMIC_SHAPES = False


def cpu_has(capability: str) -> bool:
    import openvino as ov

    return capability in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")


def inference_precision(precision: str) -> str:
    if precision == "fp32":
        return "f32"
    if precision == "fp16":
        if not cpu_has("FP16"):
            raise ValueError("this CPU has no fp16 compute; build bf16 (if it has BF16) or fp32")
        return "f16"
    if not cpu_has("BF16"):
        if precision == "bf16":
            raise ValueError("this CPU has no bf16 compute; build fp32")
        return "f32"
    return "bf16"


def _constant_types(model, refit: dict[str, RefitEntry]) -> dict[str, RefitEntry]:
    """Keep the entries whose Constant survived as a plain, same-named constant, with its dtype."""
    constants = {op.get_friendly_name(): op for op in model.get_ops() if op.get_type_name() == "Constant"}
    kept = {}
    for torch_name, entry in refit.items():
        constant = constants.get(entry.engine_name)
        if constant is None:
            continue
        dtype = constant.get_output_element_type(0).to_dtype().name
        if dtype not in ("float32", "float16"):
            continue
        kept[torch_name] = RefitEntry(entry.engine_name, entry.shape, entry.layout, dtype)
    return kept


def build_component(component: Component, module, folder: Path, precision: str, profiles: list[Profile], vae_scale: int):
    import openvino as ov

    hint = inference_precision(precision)
    first = profiles[0]
    onnx_path = folder / f"{component.value}.onnx"
    refit = export_named(component, module, onnx_path, first.width, first.height, vae_scale)
    if precision != "int8":
        # Shipped as ONNX, read by OpenVINO's ONNX frontend at load (about 0.3 s for the SD 1.5
        # UNet). We tried `ov.convert_model` + `ov.save_model` to IR: its offline constant folding
        # merges norm weights, conv biases and transposed MatMul weights into new, anonymous
        # constants (61 of 304 weights of the tiny UNet kept their names), which no refit map
        # can reach; the frontend alone keeps every weight a named Constant.
        files = [onnx_path.name, onnx_path.name + ".data"]
        return ComponentArtifact(files=files, refit=_constant_types(ov.Core().read_model(str(onnx_path)), refit)), {"inference_precision": hint}
    try:
        import nncf

        model = nncf.compress_weights(ov.Core().read_model(str(onnx_path)), mode=nncf.CompressWeightsMode.INT8_SYM)
        xml = folder / f"{component.value}.xml"
        ov.save_model(model, str(xml), compress_to_fp16=False)
        refit = _constant_types(ov.Core().read_model(str(xml)), refit)
    finally:
        onnx_path.unlink(missing_ok=True)
        (folder / (onnx_path.name + ".data")).unlink(missing_ok=True)
    return ComponentArtifact(files=[xml.name, xml.with_suffix(".bin").name], refit=refit), {"inference_precision": hint}
