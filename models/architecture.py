"""The tiny Stable Diffusion 1.x architecture of the embedded default model.

Same component classes as SD 1.5 (AutoencoderKL, UNet2DConditionModel, CLIPTextModel,
CLIPTokenizer, an SD noise schedule); only the widths and depths are small:

- VAE: 3 blocks, so 64x64x3 images <-> 16x16x4 latents (SD 1.5 downsamples 8x; 4x here
  because a 8x8 latent of a 64-pixel image loses the corners of small shapes).
- Text encoder: CLIP, hidden 32, 2 layers. Its 49,408-row token embedding is most of its
  size; that is the price of the real CLIP tokenizer.
- UNet: two levels (16x16 and 8x8) with cross-attention at both and in the middle.

Every number here is part of the shipped model's format: the server, the compiler's shape
profiles and the LoRA target names depend on them. Change them only with a retrain.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from .shapes import IMAGE_SIZE

TOKENIZER_SOURCE = Path(__file__).parent / "clip_tokenizer"
MAX_TOKENS = 77  # CLIP's context length, as SD uses it
TEXT_HIDDEN = 32
VAE_DOWNSAMPLE = 4
LATENT_SIZE = IMAGE_SIZE // VAE_DOWNSAMPLE
LATENT_CHANNELS = 4

# SD 1.x's training noise schedule; the pipeline's samplers are all derived from it.
NOISE_SCHEDULE = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    prediction_type="epsilon",
    clip_sample=False,
    set_alpha_to_one=False,
    steps_offset=1,
    timestep_spacing="leading",
)


def build_vae() -> AutoencoderKL:
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(16, 32, 64),
        layers_per_block=1,
        latent_channels=LATENT_CHANNELS,
        norm_num_groups=8,
        sample_size=IMAGE_SIZE,
        # Replaced after VAE training by 1/std of the latents, as SD's 0.18215 was chosen.
        scaling_factor=1.0,
    )


def build_unet() -> UNet2DConditionModel:
    return UNet2DConditionModel(
        # sample_size * VAE_DOWNSAMPLE is the pipeline's default height and width.
        sample_size=LATENT_SIZE,
        in_channels=LATENT_CHANNELS,
        out_channels=LATENT_CHANNELS,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(32, 64),
        layers_per_block=1,
        cross_attention_dim=TEXT_HIDDEN,
        attention_head_dim=4,  # diffusers' legacy name: this is the number of heads
        norm_num_groups=16,
    )


def build_text_encoder() -> CLIPTextModel:
    tok = load_tokenizer(TOKENIZER_SOURCE)
    config = CLIPTextConfig(
        vocab_size=len(tok),
        hidden_size=TEXT_HIDDEN,
        intermediate_size=TEXT_HIDDEN * 4,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=MAX_TOKENS,
        hidden_act="quick_gelu",
        projection_dim=TEXT_HIDDEN,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    return CLIPTextModel(config)


def load_tokenizer(folder: Path) -> CLIPTokenizer:
    """Load from the raw vocab/merges folder or from a saved tokenizer folder."""
    folder = Path(folder)
    if (folder / "tokenizer_config.json").exists():
        return CLIPTokenizer.from_pretrained(folder)
    return CLIPTokenizer(
        str(folder / "vocab.json"), str(folder / "merges.txt"), pad_token="<|endoftext|>", model_max_length=MAX_TOKENS
    )


def write_tokenizer(out: Path) -> None:
    """The CLIP BPE files plus the configs `CLIPTokenizer.from_pretrained` reads, as SD 1.5 ships them."""
    out.mkdir(parents=True, exist_ok=True)
    for name in ("vocab.json", "merges.txt"):
        shutil.copyfile(TOKENIZER_SOURCE / name, out / name)
    special = {
        "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
    }
    (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": MAX_TOKENS,
        "do_lower_case": True,
        "errors": "replace",
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": True,
        **special,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")


def write_pipeline_folder(out: Path, vae: AutoencoderKL, unet: UNet2DConditionModel, text_encoder: CLIPTextModel) -> None:
    """An ordinary diffusers StableDiffusionPipeline folder, safetensors only, fp32."""
    from diffusers import PNDMScheduler

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    vae.save_pretrained(out / "vae", safe_serialization=True)
    unet.save_pretrained(out / "unet", safe_serialization=True)
    text_encoder.save_pretrained(out / "text_encoder", safe_serialization=True)
    write_tokenizer(out / "tokenizer")
    # SD 1.5 ships a PNDM config; every other sampler is built from the same schedule.
    PNDMScheduler(skip_prk_steps=True, **{k: v for k, v in NOISE_SCHEDULE.items() if k != "clip_sample"}).save_pretrained(
        out / "scheduler"
    )
    import diffusers

    index = {
        "_class_name": "StableDiffusionPipeline",
        "_diffusers_version": diffusers.__version__,
        "feature_extractor": [None, None],
        "requires_safety_checker": False,
        "safety_checker": [None, None],
        "scheduler": ["diffusers", "PNDMScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    (out / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
