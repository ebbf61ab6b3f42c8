"""A tiny SD 1.x model folder for the compiler and backend tests (diffusers' test sizes).

Built once per test session; random weights with every norm and bias randomised too, so
that no two parameters are equal by accident and the refit map is really exercised.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import torch

TEXT_LENGTH = 77
VOCAB = 1000


def build_tiny_model(folder: Path, seed: int = 0) -> Path:
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=2, sample_size=32, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=32,
    )
    vae = AutoencoderKL(
        block_out_channels=[32, 64], in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=32,
        down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
    )
    text_encoder = CLIPTextModel(CLIPTextConfig(
        bos_token_id=0, eos_token_id=2, pad_token_id=1, hidden_size=32, intermediate_size=37, layer_norm_eps=1e-5,
        num_attention_heads=4, num_hidden_layers=5, vocab_size=VOCAB, max_position_embeddings=TEXT_LENGTH,
    ))
    with torch.no_grad():
        for module in (unet, vae, text_encoder):
            for name, param in module.named_parameters():
                if name.endswith("bias") or "norm" in name:
                    param.add_(0.05 * torch.randn_like(param))
    unet.save_pretrained(folder / "unet", safe_serialization=True)
    vae.save_pretrained(folder / "vae", safe_serialization=True)
    text_encoder.save_pretrained(folder / "text_encoder", safe_serialization=True)
    EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear").save_pretrained(folder / "scheduler")
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    return folder


def token_ids(seed: int) -> torch.Tensor:
    """A (1, 77) prompt: BOS, a few random tokens, EOS, padding."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.full((1, TEXT_LENGTH), 1, dtype=torch.int64)
    words = torch.randint(3, VOCAB, (6,), generator=generator)
    ids[0, 0], ids[0, 1:7], ids[0, 7] = 0, words, 2
    return ids


def empty_prompt_ids() -> torch.Tensor:
    ids = torch.full((1, TEXT_LENGTH), 1, dtype=torch.int64)
    ids[0, 0], ids[0, 1] = 0, 2
    return ids


# Built once per test process and shared by every compiler/backend test file (no conftest needed).
_ROOT: Path | None = None


def _root() -> Path:
    global _ROOT
    if _ROOT is None:
        import atexit
        import shutil
        import tempfile

        _ROOT = Path(tempfile.mkdtemp(prefix="impasto-compiler-tests-"))
        atexit.register(shutil.rmtree, _ROOT, True)
    return _ROOT


@functools.cache
def tiny_model_dir() -> Path:
    return build_tiny_model(_root() / "tiny-model")


PROFILE_SIZE = 32  # pixels; the tiny VAE's scale is 2, so latents are 16x16
VAE_SCALE = 2


@functools.cache
def engine_folder(backend: str, precision: str = "fp32") -> Path:
    from impasto.backends.manifest import Profile
    from impasto.compiler.build import BuildRequest, compile_model

    request = BuildRequest(tiny_model_dir(), backend, _root() / "engines", precision,
                           (Profile(PROFILE_SIZE, PROFILE_SIZE, 1, 2),))
    return compile_model(request, log=lambda message: None).folder


@functools.cache
def torch_engines():
    from impasto.backends.torch_backend import load_model

    return load_model(tiny_model_dir())
