"""Real LoRA files for the DEFAULT model, written by peft's and diffusers' own code.

peft `LoraConfig(init_lora_weights=False)` injected into the default model's UNet (and text
encoder), lora_B scaled down so the image changes clearly without blowing up, saved with
`StableDiffusionPipeline.save_lora_weights` (diffusers format) and converted to kohya with
diffusers' `convert_state_dict_to_kohya`. No key is written by hand (except in the tests that
corrupt a file on purpose).

cloneofsimo/lora files: no installed library writes them, so `save_cloneofsimo` lays out a peft
LoRA's matrices as cloneofsimo's `save_safeloras_with_embeds` does (lora/formats/cloneofsimo.py),
the LoRA injected by peft into exactly the modules cloneofsimo's injector wraps, in its order
(`injector_order`, written here from the injector's description, apart from the parser's walk).
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch

warnings.filterwarnings("ignore")

from image_checks import pixels, psnr  # noqa: F401  (re-exported for the adapter tests)
from impasto.models import default_model_path  # noqa: E402

UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1", "conv2"]
TE_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]


def _inject(model, targets, rank, seed, b_scale):
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict

    torch.manual_seed(seed)
    peft_model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=rank, target_modules=targets, init_lora_weights=False))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.mul_(b_scale)
    return {k.removeprefix("base_model.model."): v.detach().contiguous() for k, v in get_peft_model_state_dict(peft_model).items()}


def lora_state_dicts(seed: int, *, text_encoder: bool, rank: int = 4, b_scale: float = 0.5):
    """(unet peft state dict, text-encoder peft state dict or None) for the default model."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    root = Path(default_model_path())
    unet = UNet2DConditionModel.from_pretrained(root / "unet")
    unet_sd = _inject(unet, UNET_TARGETS, rank, seed, b_scale)
    te_sd = None
    if text_encoder:
        te = CLIPTextModel.from_pretrained(root / "text_encoder")
        te_sd = _inject(te, TE_TARGETS, rank, seed + 1, b_scale)
    return unet_sd, te_sd


def write_diffusers(folder: Path, seed: int, *, text_encoder: bool = False, **kw) -> Path:
    unet_sd, te_sd = lora_state_dicts(seed, text_encoder=text_encoder, **kw)
    return save_diffusers(folder, unet_sd, te_sd)


def save_diffusers(folder: Path, unet_sd: dict, te_sd: dict | None) -> Path:
    from diffusers import StableDiffusionPipeline

    folder.mkdir(parents=True, exist_ok=True)
    StableDiffusionPipeline.save_lora_weights(str(folder), unet_lora_layers=unet_sd, text_encoder_lora_layers=te_sd)
    return folder / "pytorch_lora_weights.safetensors"


# cloneofsimo's defaults: DEFAULT_TARGET_REPLACE and TEXT_ENCODER_DEFAULT_TARGET_REPLACE.
CLONEOFSIMO_CLASSES = {"unet": ["CrossAttention", "Attention", "GEGLU"], "text_encoder": ["CLIPAttention"]}


def injector_order(model, target_classes) -> list[str]:
    """The Linear modules cloneofsimo's `inject_trainable_lora` wraps, in its order
    (`_find_modules_v2`): for each module of a target class, in `modules()` order, its Linear
    descendants in `named_modules()` order. A file's index `i` is the i-th of these."""
    name_of = {id(m): n for n, m in model.named_modules()}
    return [
        name_of[id(m)]
        for ancestor in model.modules()
        if type(ancestor).__name__ in target_classes
        for _, m in ancestor.named_modules()
        if isinstance(m, torch.nn.Linear)
    ]


def cloneofsimo_lora(seed: int, *, rank: int = 4, b_scale: float = 0.5) -> tuple[dict, dict, dict[str, list[str]]]:
    """A peft LoRA on the modules cloneofsimo's injector wraps in the default model:
    (unet peft state dict, text-encoder peft state dict, {model: module names in injector order})."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    root = Path(default_model_path())
    unet = UNet2DConditionModel.from_pretrained(root / "unet")
    te = CLIPTextModel.from_pretrained(root / "text_encoder")
    order = {"unet": injector_order(unet, CLONEOFSIMO_CLASSES["unet"]), "text_encoder": injector_order(te, CLONEOFSIMO_CLASSES["text_encoder"])}
    unet_sd = _inject(unet, order["unet"], rank, seed, b_scale)
    te_sd = _inject(te, order["text_encoder"], rank, seed + 1, b_scale)
    return unet_sd, te_sd, order


def save_cloneofsimo(path: Path, lora: dict[str, dict], order: dict[str, list[str]], embeddings: dict | None = None) -> Path:
    """`save_safeloras_with_embeds`' layout: `<model>:<i>:up` / `:down` in injector order, metadata
    `<model>` (the target classes) and `<model>:<i>:rank`, each token's tensor with metadata
    `<embed>`. `lora` is {model: peft state dict}; with lora_alpha == r peft's scale is 1, so `up`
    is lora_B as is (cloneofsimo stores it multiplied by the scale)."""
    from safetensors.torch import save_file

    tensors, metadata = {}, {}
    for model_name, sd in lora.items():
        metadata[model_name] = json.dumps(CLONEOFSIMO_CLASSES[model_name])
        for i, name in enumerate(order[model_name]):
            tensors[f"{model_name}:{i}:up"] = sd[f"{name}.lora_B.weight"]
            tensors[f"{model_name}:{i}:down"] = sd[f"{name}.lora_A.weight"]
            metadata[f"{model_name}:{i}:rank"] = str(sd[f"{name}.lora_A.weight"].shape[0])
    for token, vector in (embeddings or {}).items():
        tensors[token] = vector.contiguous()
        metadata[token] = "<embed>"
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata=metadata)
    return path


def write_kohya(path: Path, seed: int, *, text_encoder: bool = False, **kw) -> Path:
    """lora_alpha == r, so peft's scale is 1 and diffusers' converter (alpha = rank) is exact."""
    from diffusers.utils.state_dict_utils import convert_state_dict_to_kohya
    from safetensors.torch import save_file

    unet_sd, te_sd = lora_state_dicts(seed, text_encoder=text_encoder, **kw)
    sd = {f"unet.{k}": v for k, v in unet_sd.items()}
    if te_sd:
        sd.update({f"text_encoder.{k}": v for k, v in te_sd.items()})
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in convert_state_dict_to_kohya(sd).items()}, str(path))
    return path
