"""TensorRT build step: ONNX -> serialized engine (`<component>.plan`), refittable, one
optimisation profile per shape profile. Needs an NVIDIA GPU and the tensorrt package.

TensorRT's ONNX parser names each weight after its initializer, so the refit map's engine
names (= torch names, see onnx_weights.py) are what `trt.Refitter.set_named_weights` takes.
All weights are built refittable (`BuilderFlag.REFIT`): LoRA may touch any Linear or Conv
(LoCon), and which ones depends on the adapter, not on the build. With REFIT, TensorRT keeps
constant folding away from refittable weights, so a refit reaches every use of a weight.
"""

from __future__ import annotations

from pathlib import Path

from impasto.backends.base import Component
from impasto.backends.manifest import ComponentArtifact, Profile

from .onnx_export import TEXT_LENGTH, export_named

DYNAMIC_SHAPES = False  # engines take the optimisation profiles' ranges only
WORKSPACE_BYTES = 8 << 30


def profile_shapes(component: Component, module, profile: Profile, vae_scale: int) -> dict[str, tuple[tuple, tuple, tuple]]:
    """Input name -> (min, opt, max) shapes for one TensorRT optimisation profile."""
    lo, hi = profile.min_batch, profile.max_batch
    h, w = profile.height, profile.width
    lh, lw = h // vae_scale, w // vae_scale

    def batched(*rest):
        return ((lo, *rest), (hi, *rest), (hi, *rest))

    if component is Component.UNET:
        channels = module.config.in_channels
        return {"sample": batched(channels, lh, lw), "timestep": batched(),
                "encoder_hidden_states": batched(TEXT_LENGTH, module.config.cross_attention_dim)}
    if component is Component.TEXT_ENCODER:
        return {"input_ids": batched(TEXT_LENGTH)}
    if component is Component.VAE_DECODER:
        return {"latent": batched(module.config.latent_channels, lh, lw)}
    return {"image": batched(module.config.in_channels, h, w)}


def build_component(component: Component, module, folder: Path, precision: str, profiles: list[Profile], vae_scale: int):
    import tensorrt as trt

    first = profiles[0]
    onnx_path = folder / f".{component.value}.onnx"
    refit = export_named(component, module, onnx_path, first.width, first.height, vae_scale)
    try:
        logger = trt.Logger(trt.Logger.WARNING)
        builder = trt.Builder(logger)
        network = builder.create_network(0)  # explicit batch is the only mode in TensorRT 10
        parser = trt.OnnxParser(network, logger)
        if not parser.parse_from_file(str(onnx_path)):
            errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise RuntimeError(f"{component.value}: TensorRT cannot parse the ONNX graph: {errors}")
        config = builder.create_builder_config()
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, WORKSPACE_BYTES)
        config.set_flag(trt.BuilderFlag.REFIT)
        if precision == "fp16":
            config.set_flag(trt.BuilderFlag.FP16)
        seen = set()
        for profile in profiles:
            shapes = profile_shapes(component, module, profile, vae_scale)
            key = tuple(sorted(shapes.items()))
            if key in seen:  # the text encoder's profiles differ only in image size
                continue
            seen.add(key)
            optimisation = builder.create_optimization_profile()
            for name, (lo, opt, hi) in shapes.items():
                optimisation.set_shape(name, lo, opt, hi)
            config.add_optimization_profile(optimisation)
        plan = builder.build_serialized_network(network, config)
        if plan is None:
            raise RuntimeError(f"{component.value}: TensorRT engine build failed (see the log above)")
        path = folder / f"{component.value}.plan"
        path.write_bytes(bytes(plan))
    finally:
        onnx_path.unlink(missing_ok=True)
        (folder / (onnx_path.name + ".data")).unlink(missing_ok=True)
    return ComponentArtifact(files=[path.name], refit=refit), {}
