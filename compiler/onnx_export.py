"""Export one model component to ONNX with the contract's input/output names and torch's weight names.

We use torch's TorchScript-based exporter (`dynamo=False`): it exports diffusers' UNet, VAE and
CLIP in seconds and is what optimum and diffusers' own ONNX pipelines were built on. We export
with `do_constant_folding=False` on purpose: constant folding turns `Linear` weights into
anonymous transposed initializers (`onnx::MatMul_1234`), and the refit map then needs guessing by
tensor content, which is ambiguous for equal tensors (every fresh GroupNorm weight is all ones).
Without folding, every initializer keeps its parameter's name, and `onnx_weights.py` does the
little folding we need in a way that keeps the names. The runtimes fold the rest at load.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from impasto.backends.base import (
    TEXT_ENCODER_INPUTS,
    TEXT_ENCODER_OUTPUTS,
    UNET_INPUTS,
    UNET_OUTPUTS,
    VAE_DECODER_INPUTS,
    VAE_DECODER_OUTPUTS,
    VAE_ENCODER_INPUTS,
    VAE_ENCODER_OUTPUTS,
    Component,
)

OPSET = 17  # LayerNormalization is native from 17; every runtime we target reads it
WRAPPED = "model"  # attribute name of the wrapped module; exported weight names start with "model."
TEXT_LENGTH = 77  # CLIP's context length, fixed for every SD 1.x / 2.x text encoder


class _UNetForExport(torch.nn.Module):
    def __init__(self, unet):
        super().__init__()
        self.model = unet

    def forward(self, sample, timestep, encoder_hidden_states):
        return self.model(sample, timestep, encoder_hidden_states=encoder_hidden_states, return_dict=False)[0]


class _TextEncoderForExport(torch.nn.Module):
    def __init__(self, text_encoder):
        super().__init__()
        self.model = text_encoder

    def forward(self, input_ids):
        return self.model(input_ids, output_hidden_states=False)[0]


class _VAEDecoderForExport(torch.nn.Module):
    def __init__(self, vae):
        super().__init__()
        self.model = vae

    def forward(self, latent):
        return self.model.decode(latent, return_dict=False)[0]


class _VAEEncoderForExport(torch.nn.Module):
    def __init__(self, vae):
        super().__init__()
        self.model = vae

    def forward(self, image):
        return self.model.encode(image).latent_dist.mean


@dataclass(frozen=True)
class ExportSpec:
    """How one component is exported: its wrapper, names, example inputs, dynamic axes."""

    wrapper: torch.nn.Module
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    example: tuple[torch.Tensor, ...]
    dynamic_axes: dict[str, dict[int, str]]


def vae_scale_factor(vae) -> int:
    """Image pixels per latent pixel (8 for every SD VAE; smaller for tiny test VAEs)."""
    return 2 ** (len(vae.config.block_out_channels) - 1)


def export_spec(component: Component, module: torch.nn.Module, width: int, height: int, vae_scale: int = 8) -> ExportSpec:
    """The export recipe for `component`; width/height (pixels) only size the example inputs."""
    batch = 2  # not 1: a batch of 1 tempts the tracer into specialising the batch axis
    if component is Component.UNET:
        channels = module.config.in_channels
        factor = 2 ** (len(module.config.block_out_channels) - 1)
        latent_hw = (max(height // vae_scale, factor), max(width // vae_scale, factor))
        example = (
            torch.randn(batch, channels, *latent_hw),
            torch.tensor([500.0, 20.0][:batch]),
            torch.randn(batch, TEXT_LENGTH, module.config.cross_attention_dim),
        )
        dynamic = {"sample": {0: "batch", 2: "latent_height", 3: "latent_width"}, "timestep": {0: "batch"},
                   "encoder_hidden_states": {0: "batch"}, "noise_pred": {0: "batch", 2: "latent_height", 3: "latent_width"}}
        return ExportSpec(_UNetForExport(module), UNET_INPUTS, UNET_OUTPUTS, example, dynamic)
    if component is Component.TEXT_ENCODER:
        example = (torch.randint(0, module.config.vocab_size, (batch, TEXT_LENGTH), dtype=torch.int64),)
        dynamic = {"input_ids": {0: "batch"}, "last_hidden_state": {0: "batch"}}
        return ExportSpec(_TextEncoderForExport(module), TEXT_ENCODER_INPUTS, TEXT_ENCODER_OUTPUTS, example, dynamic)
    scale = vae_scale_factor(module)
    if component is Component.VAE_DECODER:
        example = (torch.randn(batch, module.config.latent_channels, height // scale, width // scale),)
        dynamic = {"latent": {0: "batch", 2: "latent_height", 3: "latent_width"}, "image": {0: "batch", 2: "height", 3: "width"}}
        return ExportSpec(_VAEDecoderForExport(module), VAE_DECODER_INPUTS, VAE_DECODER_OUTPUTS, example, dynamic)
    if component is Component.VAE_ENCODER:
        example = (torch.randn(batch, module.config.in_channels, height, width),)
        dynamic = {"image": {0: "batch", 2: "height", 3: "width"}, "latent_mean": {0: "batch", 2: "latent_height", 3: "latent_width"}}
        return ExportSpec(_VAEEncoderForExport(module), VAE_ENCODER_INPUTS, VAE_ENCODER_OUTPUTS, example, dynamic)
    raise ValueError(f"unknown component {component}")


def export_onnx(spec: ExportSpec, path: Path) -> None:
    """Write the component's ONNX graph (weights inline below 2 GB, else as external data)."""
    spec.wrapper.eval().requires_grad_(False)
    with warnings.catch_warnings(), torch.no_grad():
        # the TorchScript exporter is deprecated in favour of dynamo; its warnings are not actionable here
        warnings.simplefilter("ignore")
        torch.onnx.export(
            spec.wrapper,
            spec.example,
            str(path),
            dynamo=False,
            input_names=list(spec.inputs),
            output_names=list(spec.outputs),
            dynamic_axes=spec.dynamic_axes,
            opset_version=OPSET,
            do_constant_folding=False,
        )


def export_named(component: Component, module: torch.nn.Module, out_path: Path, width: int, height: int,
                 vae_scale: int = 8, transform=None) -> dict:
    """Export `component` to `out_path` (graph) + `out_path.data` (its weights), named by torch
    parameter names; return its refit map. `transform(model)` may rewrite the ONNX graph before
    it is saved (e.g. an fp16 conversion); the map's dtypes are read after it.
    """
    import shutil

    import onnx

    from .onnx_weights import name_weights, save_with_external_weights, weight_dtypes

    scratch = out_path.parent / f".{out_path.stem}.export"
    scratch.mkdir(parents=True, exist_ok=False)
    try:
        # the exporter writes one file per tensor beside the graph when the model is over 2 GB
        export_onnx(export_spec(component, module, width, height, vae_scale), scratch / "raw.onnx")
        model = onnx.load(str(scratch / "raw.onnx"))
        refit = name_weights(model, {name: tuple(p.shape) for name, p in module.named_parameters()})
        if transform is not None:
            model = transform(model)
        refit = weight_dtypes(model, refit)
        save_with_external_weights(model, out_path, [entry.engine_name for entry in refit.values()])
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return refit
