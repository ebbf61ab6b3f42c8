"""ONNX Runtime build step: the named ONNX graph is the engine (plus fusions for the UNet).

ONNX Runtime optimises the graph itself when the session is created (ORT_ENABLE_ALL), so the
folder keeps the portable graph and one weights file per component, which the engine reads
into its own buffers for refit.

For the UNet we also run onnxruntime's transformer optimizer (model_type "unet"), with the
fusions that produce GPU-only ops (GroupNorm, NhwcConv, BiasSplitGelu, packed QKV/KV,
BiasAdd) turned off unless the build is fp16 for a GPU, because the CPU provider has no
kernels for them. Packed QKV would also merge three torch weights into one initializer,
which a one-to-one refit map cannot express; `weight_dtypes` fails the build if a fusion
ever drops or renames a mapped weight.
"""

from __future__ import annotations

from pathlib import Path

from impasto.backends.base import Component
from impasto.backends.manifest import ComponentArtifact, Profile

from .onnx_export import export_named

DYNAMIC_SHAPES = True  # one graph takes every batch and size; profiles are only export hints


def _unet_fusions(model, precision: str):
    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model

    options = FusionOptions("unet")
    options.enable_shape_inference = False  # onnx shape inference cannot serialise a >2 GB graph
    options.enable_packed_qkv = False
    options.enable_packed_kv = False
    if precision != "fp16":
        options.enable_group_norm = False
        options.enable_skip_group_norm = False
        options.enable_nhwc_conv = False
        options.enable_bias_splitgelu = False
        options.enable_bias_add = False
    optimized = optimize_model(model, model_type="unet", num_heads=0, hidden_size=0,
                               optimization_options=options, opt_level=0, use_gpu=precision == "fp16")
    return optimized.model


def _to_fp16(model):
    from onnxruntime.transformers.float16 import convert_float_to_float16

    # keep_io_types: the contract's inputs and outputs stay float32 tensors
    return convert_float_to_float16(model, keep_io_types=True, disable_shape_infer=True)


def build_component(component: Component, module, folder: Path, precision: str, profiles: list[Profile], vae_scale: int):
    """Write `<component>.onnx` + `.onnx.data` into `folder`; return its artifact and options."""
    first = profiles[0]

    def transform(model):
        if component is Component.UNET:
            model = _unet_fusions(model, precision)
        if precision == "fp16":
            model = _to_fp16(model)
        return model

    path = folder / f"{component.value}.onnx"
    refit = export_named(component, module, path, first.width, first.height, vae_scale, transform)
    return ComponentArtifact(files=[path.name, path.name + ".data"], refit=refit), {}
