"""The PyTorch backend: the reference every compiled backend is tested against, and the fallback.

It runs diffusers' and transformers' own modules eagerly. Refit copies weights in place
(`copy_`) and keeps a pristine copy of every weight it ever touched, so `restore` is exact.
Beyond the Engine contract, `refit_in_place` lets a caller compute new values straight into
the parameters, and `pristine_weights` shares the pristine copies (adapter_weights.py uses
both: no merged tensors for a set that is not cached, one base copy).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import torch

from .base import Component, Engine, EngineInfo, ModelEngines, ShapeProfile

BACKEND_NAME = "torch"


class _TorchModuleEngine(Engine):
    def __init__(self, module: torch.nn.Module, component: Component, device: str, dtype: torch.dtype):
        if next(module.parameters()).dtype != dtype:
            module = module.to(dtype=dtype)
        self.module = module.to(device=device).eval().requires_grad_(False)
        self.component = component
        self.device = device
        self.dtype = dtype
        self._params = dict(self.module.named_parameters())
        self._base: dict[str, torch.Tensor] = {}  # pristine copies, only of weights refitted (or asked for by pristine_weights)

    def _check_names(self, names) -> None:
        unknown = [name for name in names if name not in self._params]
        if unknown:
            raise KeyError(f"{self.component.value}: no such weights: {', '.join(sorted(unknown)[:10])}")

    def _keep_pristine(self, names) -> None:
        # Taken before a weight is first written, while it still holds the base value.
        for name in names:
            if name not in self._base:
                self._base[name] = self._params[name].detach().clone()

    def refit(self, named_weights: Mapping[str, torch.Tensor]) -> None:
        self._check_names(named_weights)
        with torch.no_grad():
            for name, value in named_weights.items():
                param = self._params[name]
                if tuple(value.shape) != tuple(param.shape):
                    raise ValueError(f"{self.component.value}.{name}: shape {tuple(value.shape)} != {tuple(param.shape)}")
                self._keep_pristine([name])
                param.copy_(value)

    def refit_in_place(self, names: Sequence[str], write: Callable[[str, torch.Tensor, torch.Tensor], object]) -> None:
        """A refit whose values are computed straight into the parameters: `write(name, param,
        pristine)` must set every element of `param` (to a full weight, never accumulating, as
        `refit` takes), reading the base from `pristine`. No full-size value tensor exists
        outside the engine, so a LoRA switch that is not cached allocates nothing and copies
        nothing in (fresh memory costs a page fault per 4 KiB, more than the copy itself).
        Pristine copies are taken first, so `restore` is exact even when a `write` fails halfway."""
        self._check_names(names)
        with torch.no_grad():
            self._keep_pristine(names)
            for name in names:
                write(name, self._params[name].detach(), self._base[name])

    def pristine_weights(self, names: Sequence[str]) -> dict[str, torch.Tensor]:
        """The base values of `names`, bit for bit, whatever was refitted since: the copies
        `restore` uses (taken now for weights never refitted). Shared, read-only. A caller that
        needs base values reads these instead of keeping a second copy of its own."""
        self._check_names(names)
        self._keep_pristine(names)
        return {name: self._base[name] for name in names}

    def restore(self) -> None:
        with torch.no_grad():
            for name, value in self._base.items():
                self._params[name].copy_(value)

    def named_weights(self) -> dict[str, torch.Tensor]:
        """The current weights by torch name (the refit map's source side)."""
        return {name: p.detach() for name, p in self._params.items()}

    def info(self) -> EngineInfo:
        precision = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}[self.dtype]
        return EngineInfo(self.component, BACKEND_NAME, precision, self.device, ShapeProfile())


class TorchTextEncoder(_TorchModuleEngine):
    def __init__(self, module, device="cpu", dtype=torch.float32):
        super().__init__(module, Component.TEXT_ENCODER, device, dtype)

    def run(self, inputs):
        with torch.inference_mode(), self._token_vectors(inputs):
            out = self.module(inputs["input_ids"].to(self.device), output_hidden_states=False)
        return {"last_hidden_state": out[0].float().cpu()}

    @contextlib.contextmanager
    def _token_vectors(self, inputs):
        """Replace token-table rows by `token_vectors` where `token_vector_mask` is set, for
        one call (base.TEXT_ENCODER_VECTOR_INPUTS). A hook on the token table rather than our own
        copy of the model's forward: the rest of the encoder (positions, causal mask, layers) stays
        the library's own code, and the values are what a row of the table would have given."""
        if "token_vectors" not in inputs:
            yield
            return
        vectors = inputs["token_vectors"].to(self.device, self.dtype)
        mask = inputs["token_vector_mask"].to(self.device).unsqueeze(-1)

        def replace(_module, _args, output):
            return torch.where(mask, vectors, output)

        handle = self.module.get_input_embeddings().register_forward_hook(replace)
        try:
            yield
        finally:
            handle.remove()


class TorchUNet(_TorchModuleEngine):
    def __init__(self, module, device="cpu", dtype=torch.float32):
        super().__init__(module, Component.UNET, device, dtype)

    def run(self, inputs):
        with torch.inference_mode():
            out = self.module(
                inputs["sample"].to(self.device, self.dtype),
                inputs["timestep"].to(self.device),
                encoder_hidden_states=inputs["encoder_hidden_states"].to(self.device, self.dtype),
                return_dict=False,
            )[0]
        return {"noise_pred": out.float().cpu()}


class TorchVAEDecoder(_TorchModuleEngine):
    def __init__(self, module, device="cpu", dtype=torch.float32):
        super().__init__(module, Component.VAE_DECODER, device, dtype)

    def run(self, inputs):
        with torch.inference_mode():
            out = self.module.decode(inputs["latent"].to(self.device, self.dtype), return_dict=False)[0]
        return {"image": out.float().cpu()}


class TorchVAEEncoder(_TorchModuleEngine):
    def __init__(self, module, device="cpu", dtype=torch.float32):
        super().__init__(module, Component.VAE_ENCODER, device, dtype)

    def run(self, inputs):
        with torch.inference_mode():
            dist = self.module.encode(inputs["image"].to(self.device, self.dtype)).latent_dist
        return {"latent_mean": dist.mean.float().cpu()}


def load_model(model_dir: str | Path, device: str = "cpu", dtype: torch.dtype = torch.float32) -> ModelEngines:
    """Load a diffusers-layout folder's components as torch engines (safetensors only)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    model_dir = Path(model_dir)
    text_encoder = CLIPTextModel.from_pretrained(model_dir / "text_encoder", use_safetensors=True)
    unet = UNet2DConditionModel.from_pretrained(model_dir / "unet", use_safetensors=True)
    vae = AutoencoderKL.from_pretrained(model_dir / "vae", use_safetensors=True)
    # The decoder and encoder engines share one module: one copy of the VAE in memory.
    return ModelEngines(
        text_encoder=TorchTextEncoder(text_encoder, device, dtype),
        unet=TorchUNet(unet, device, dtype),
        vae_decoder=TorchVAEDecoder(vae, device, dtype),
        vae_encoder=TorchVAEEncoder(vae, device, dtype),
    )
