"""Write a canonical adapter as kohya/A1111, diffusers or a PEFT folder (atomic writes).

kohya: keys from diffusers' `convert_state_dict_to_kohya`, with two corrections, because that
converter (0.42.1) writes `alpha = rank` for every module (dropping any other scale) and always
names the first text encoder `lora_te1_`: we write each module's real alpha, and use `lora_te_`
when there is no second text encoder, as kohya-ss does for SD 1.x/2.x (`lora_te1_`/`lora_te2_`
only for SDXL). UNet names stay in diffusers' block naming (`lora_unet_down_blocks_0_…`), the
SD 1.x kohya spelling; A1111 converts such names itself (`convert_diffusers_name_to_compvis`).
SDXL files from kohya use SGM block names instead; we do not write those (tested here: diffusers'
own kohya reader loads our files with the right scales). Embeddings are bundled the A1111 way (`bundle_emb.<token>.string_to_param.*`,
or `.clip_l` / `.clip_g` for a two-encoder adapter).

An adapter of embeddings alone (textual inversion) has no LoRA to bundle them with. With one
token it is written as the embedding file A1111 and kohya-ss read and write: `{"emb_params":
[n, dim]}`, or `{"clip_l", "clip_g"}` for two text encoders. Such a file does not hold its token:
A1111 uses the file's name, so name the file after the token (`formats/embedding.py` reads it
back with the name it is given). With several tokens it is the bundle form above without LoRA
keys, which A1111 loads as a LoRA file that only brings embeddings.

diffusers: the current PEFT-style file (`unet.<path>.lora_A.weight`, ...) with each component's
LoraConfig in `lora_adapter_metadata`, as `save_lora_weights` writes it; loadable by
`load_lora_weights` / `load_lora_adapter`. Text-encoder module paths in the config are written
without `text_model.`: peft matches config names as suffixes, so they then match both the
flattened transformers-5 CLIPTextModel and CLIPTextModelWithProjection, while diffusers strips
`text_model.` from the weight keys itself when the model has none.

PEFT folder: `adapter_model.safetensors` + `adapter_config.json` (peft's own `LoraConfig` writes
it) for one component, loadable by `PeftModel.from_pretrained`.

Where a component has several ranks or alphas, r / lora_alpha are the most common values and the
others go in rank_pattern / alpha_pattern keyed by full module path.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path

import torch
from diffusers.utils.state_dict_utils import convert_state_dict_to_kohya

from impasto.atomic_files import atomic_directory

from .canonical import CanonicalAdapter, split_target
from .errors import AdapterFormatError
from .files import write_safetensors
from .formats.diffusers import METADATA_KEY
from .formats.peft import PREFIX, WEIGHTS_NAME
from .match import TargetResolver

_BUNDLE_KEY_ONE_ENCODER = {"text_encoder": "string_to_param.*"}
_BUNDLE_KEY_TWO_ENCODERS = {"text_encoder": "clip_l", "text_encoder_2": "clip_g"}


def _peft_keys(adapter: CanonicalAdapter) -> dict[str, torch.Tensor]:
    out = {}
    for target, m in adapter.modules.items():
        out[f"{target}.lora_A.weight"] = m.down
        out[f"{target}.lora_B.weight"] = m.up
    return out


def _fits_embedding_file(adapter: CanonicalAdapter) -> bool:
    return (
        not adapter.modules
        and len(adapter.embeddings) == 1
        and set(next(iter(adapter.embeddings.values()))) in ({"text_encoder"}, set(_BUNDLE_KEY_TWO_ENCODERS))
    )


def embedding_file_state_dict(adapter: CanonicalAdapter) -> dict[str, torch.Tensor]:
    """A1111 / kohya-ss's textual-inversion file of a one-token adapter (see the docstring)."""
    if not _fits_embedding_file(adapter):
        raise AdapterFormatError("an embedding file holds one token (for the first, or both, text encoders) and no LoRA modules")
    (per,) = adapter.embeddings.values()
    if set(per) == {"text_encoder"}:
        return {"emb_params": per["text_encoder"]}
    return {_BUNDLE_KEY_TWO_ENCODERS[c]: v for c, v in per.items()}


def kohya_state_dict(adapter: CanonicalAdapter) -> dict[str, torch.Tensor]:
    if _fits_embedding_file(adapter):
        return embedding_file_state_dict(adapter)
    # diffusers' converter refuses an empty LoRA state dict: embeddings alone are only bundled.
    sd = convert_state_dict_to_kohya(_peft_keys(adapter)) if adapter.modules else {}
    two_encoders = "text_encoder_2" in adapter.components
    if not two_encoders:
        sd = {("lora_te_" + k[len("lora_te1_"):] if k.startswith("lora_te1_") else k): v for k, v in sd.items()}
    # Real alphas, keyed through the same name the converter gave the module's down weight.
    # (The converter passes tensors through unchanged, so identity finds the module.)
    by_down = {id(m.down): m for m in adapter.modules.values()}
    for key in [k for k in sd if k.endswith(".lora_down.weight")]:
        module = by_down[id(sd[key])]
        sd[key.replace(".lora_down.weight", ".alpha")] = torch.tensor(module.alpha, dtype=torch.float32)
    bundle = _BUNDLE_KEY_TWO_ENCODERS if two_encoders else _BUNDLE_KEY_ONE_ENCODER
    for token, per in adapter.embeddings.items():
        for component, vectors in per.items():
            sd[f"bundle_emb.{token}.{bundle[component]}"] = vectors
    return sd


def export_kohya(adapter: CanonicalAdapter, path: str | os.PathLike, metadata: dict[str, str] | None = None) -> Path:
    meta = {k: v for k, v in adapter.metadata.items() if k.startswith(("ss_", "modelspec."))}
    meta.update(metadata or {})
    return write_safetensors(path, kohya_state_dict(adapter), meta)


def _config_path(component: str, path: str) -> str:
    if component.startswith("text_encoder"):
        return path.removeprefix("text_model.")
    return path


def lora_config_dict(adapter: CanonicalAdapter, component: str, paths: dict[str, str] | None = None) -> dict:
    """r, lora_alpha, target_modules, rank_pattern, alpha_pattern for one component.

    `paths` maps canonical module path -> the path to write (default: `_config_path`).
    """
    mods = adapter.modules_of(component)
    if not mods:
        raise AdapterFormatError(f"adapter has no {component} modules")
    name = {p: (paths[p] if paths else _config_path(component, p)) for p in mods}
    r = Counter(m.rank for m in mods.values()).most_common(1)[0][0]
    lora_alpha = Counter(m.alpha for m in mods.values()).most_common(1)[0][0]
    return {
        "r": r,
        "lora_alpha": lora_alpha,
        "target_modules": sorted(name.values()),
        "rank_pattern": {name[p]: m.rank for p, m in sorted(mods.items()) if m.rank != r},
        "alpha_pattern": {name[p]: m.alpha for p, m in sorted(mods.items()) if m.alpha != lora_alpha},
    }


def _refuse_embeddings(adapter: CanonicalAdapter, fmt: str, drop_embeddings: bool) -> None:
    if adapter.embeddings and not drop_embeddings:
        raise AdapterFormatError(
            f"the {fmt} format has no place for textual-inversion embeddings ({', '.join(sorted(adapter.embeddings))}); "
            "export kohya (which bundles them) or pass drop_embeddings"
        )


def diffusers_state_dict(adapter: CanonicalAdapter) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    sd = _peft_keys(adapter)
    packed = {}
    for component in adapter.components:
        if adapter.modules_of(component):
            for k, v in lora_config_dict(adapter, component).items():
                packed[f"{component}.{k}"] = v
    return sd, {METADATA_KEY: json.dumps(packed, indent=2, sort_keys=True)}


def export_diffusers(adapter: CanonicalAdapter, path: str | os.PathLike, *, drop_embeddings: bool = False) -> Path:
    """One `pytorch_lora_weights.safetensors`-style file."""
    _refuse_embeddings(adapter, "diffusers", drop_embeddings)
    sd, meta = diffusers_state_dict(adapter)
    return write_safetensors(path, sd, meta)


def export_peft_folder(
    adapter: CanonicalAdapter,
    folder: str | os.PathLike,
    *,
    component: str = "unet",
    module_names=None,
    base_model_name_or_path: str | None = None,
    overwrite: bool = False,
    drop_embeddings: bool = False,
) -> Path:
    """A PEFT adapter folder for one component.

    `module_names`: the base model's module names; given, each target is written under the name
    that model uses (needed for a text encoder: transformers 5's CLIPTextModel has no
    `text_model.`). Without it, canonical paths are written.
    """
    from peft import LoraConfig  # peft is the `lora` extra; only this writer needs it

    _refuse_embeddings(adapter, "PEFT", drop_embeddings)
    mods = adapter.modules_of(component)
    if not mods:
        raise AdapterFormatError(f"adapter has no {component} modules")
    if module_names is not None:
        resolver = TargetResolver(f"{component}.{n}.weight" for n in module_names)
        paths = {}
        for p in mods:
            found = resolver.resolve(f"{component}.{p}")
            if found is None:
                raise AdapterFormatError(f"{component}.{p}: not among the given module names")
            paths[p] = split_target(found)[1].removesuffix(".weight")
    else:
        paths = {p: p for p in mods}
    fields = lora_config_dict(adapter, component, paths)
    config = LoraConfig(base_model_name_or_path=base_model_name_or_path, **fields)
    tensors = {}
    for p, m in mods.items():
        tensors[f"{PREFIX}{paths[p]}.lora_A.weight"] = m.down
        tensors[f"{PREFIX}{paths[p]}.lora_B.weight"] = m.up
    folder = Path(folder)
    with atomic_directory(folder, overwrite=overwrite) as tmp:
        config.save_pretrained(str(tmp))
        write_safetensors(tmp / WEIGHTS_NAME, tensors)
    return folder


__all__ = [
    "diffusers_state_dict",
    "embedding_file_state_dict",
    "export_diffusers",
    "export_kohya",
    "export_peft_folder",
    "kohya_state_dict",
    "lora_config_dict",
]
