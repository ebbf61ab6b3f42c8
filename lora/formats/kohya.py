"""kohya-ss / AUTOMATIC1111 LoRA files.

Keys: `lora_unet_<path with _>.lora_down.weight`, `.lora_up.weight`, `.alpha`; text encoders
`lora_te_` (SD 1.x/2.x), `lora_te1_` / `lora_te2_` (SDXL). SDXL files name UNet blocks the SGM
way (`input_blocks_4_1_…`). A1111 bundles textual-inversion vectors as
`bundle_emb.<token>.string_to_param.*` (or `.clip_l` / `.clip_g` for SDXL).

Names are converted with diffusers' own code (0.42.1): `_maybe_map_sgm_blocks_to_diffusers` for
SGM block numbers, `_convert_non_diffusers_lora_to_diffusers` for the `_`-to-`.` key map, then
`convert_unet_state_dict_to_peft` / `convert_state_dict_to_diffusers` + `convert_state_dict_to_peft`
exactly as diffusers' loaders chain them. We call the converter once per module rather than on
the whole file because diffusers' own alpha naming (`_get_alpha_name`) is not uniform across
module kinds (attention keys come out as `…to_q_lora.down.weight.alpha`); converting one module
at a time ties each `.alpha` to its module without depending on that.

Scale: alpha / rank. A missing alpha is scale 1: A1111 (`NetworkModule.calc_scale`) returns 1.0
when alpha is None, and kohya's LoRAModule uses alpha = rank for None or 0. An alpha of 0 is
therefore read as kohya reads it (scale 1), and reported in `warnings` because A1111 would apply
scale 0. diffusers differs here: for a file where only some modules have an alpha it gives the
others the most common alpha (`get_peft_kwargs`); we follow A1111 and kohya instead.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch
from diffusers.loaders.lora_conversion_utils import (
    _convert_non_diffusers_lora_to_diffusers,
    _maybe_map_sgm_blocks_to_diffusers,
)
from diffusers.utils.state_dict_utils import (
    StateDictType,
    convert_state_dict_to_diffusers,
    convert_state_dict_to_peft,
    convert_unet_state_dict_to_peft,
)

from ..canonical import CanonicalAdapter, LoraModule, canonical_target
from ..errors import AdapterFormatError, list_keys
from ._common import refuse_dora_and_bias

NAME = "kohya"
PREFIXES = {"lora_unet_": "unet", "lora_te_": "text_encoder", "lora_te1_": "text_encoder", "lora_te2_": "text_encoder_2"}
_SUFFIXES = (".lora_down.weight", ".lora_up.weight", ".alpha")
_SGM = ("input_blocks", "middle_block", "output_blocks")
_BUNDLE = "bundle_emb."
_BUNDLE_COMPONENT = {"string_to_param.*": "text_encoder", "clip_l": "text_encoder", "clip_g": "text_encoder_2"}
# Every SD 1.x, 2.x and SDXL UNet has two layers per block; the SGM numbering depends on it.
DEFAULT_LAYERS_PER_BLOCK = 2


def detect(state_dict, metadata) -> bool:
    # A file of bundled embeddings alone is A1111's form of a textual inversion in a LoRA file.
    return any(k.startswith(tuple(PREFIXES)) for k in state_dict) or (bool(state_dict) and all(k.startswith(_BUNDLE) for k in state_dict))


def _component_of(lora_name: str) -> str | None:
    for prefix, component in PREFIXES.items():
        if lora_name.startswith(prefix):
            return component
    return None


def _module_path(component: str, lora_name: str, down: torch.Tensor, up: torch.Tensor, where: str) -> str:
    """diffusers module path of one kohya module, through diffusers' converters."""
    converted, _ = _convert_non_diffusers_lora_to_diffusers(
        {f"{lora_name}.lora_down.weight": down, f"{lora_name}.lora_up.weight": up}
    )
    prefix = component + "."
    sd = {k.removeprefix(prefix): v for k, v in converted.items()}
    if component == "unet":
        sd = convert_unet_state_dict_to_peft(sd)
    else:
        # What `_load_lora_into_text_encoder` does, with the types given: one module alone
        # defeats the converters' whole-dict type guess.
        sd = convert_state_dict_to_diffusers(sd, original_type=StateDictType.DIFFUSERS_OLD)
        sd = convert_state_dict_to_peft(sd, original_type=StateDictType.DIFFUSERS)
    paths = {k.removesuffix(".lora_A.weight") for k in sd if k.endswith(".lora_A.weight")}
    if len(paths) != 1 or not all(k.endswith((".lora_A.weight", ".lora_B.weight")) for k in sd):
        raise AdapterFormatError(f"{where}: diffusers' converter could not name module {lora_name} (got {sorted(sd)})")
    return paths.pop()


def parse(state_dict, metadata, *, unet_config=None, where: str = "kohya file", **_) -> CanonicalAdapter:
    """Parse a kohya/A1111 state dict. `unet_config` (anything with `layers_per_block`) maps SGM names."""
    refuse_dora_and_bias(state_dict.keys(), where)
    warnings: list[str] = []
    embeddings: dict[str, dict[str, torch.Tensor]] = {}
    groups: dict[str, dict[str, torch.Tensor]] = {}
    unknown = []
    for key, value in state_dict.items():
        if key.startswith(_BUNDLE):
            token, _, rest = key[len(_BUNDLE):].partition(".")
            component = _BUNDLE_COMPONENT.get(rest)
            if component is None or not token:
                unknown.append(key)
                continue
            embeddings.setdefault(token, {})[component] = value.reshape(-1, value.shape[-1])
            continue
        name, dot, suffix = key.partition(".")
        if _component_of(name) is None or "." + suffix not in _SUFFIXES:
            unknown.append(key)
            continue
        groups.setdefault(name, {})["." + suffix] = value
    if unknown:
        raise AdapterFormatError(f"{where}: unknown keys (not kohya LoRA down/up/alpha): {list_keys(unknown)}")
    half = [n for n, g in groups.items() if ".lora_down.weight" not in g or ".lora_up.weight" not in g]
    if half:
        raise AdapterFormatError(f"{where}: modules without both lora_down and lora_up: {list_keys(half)}")

    # SGM block numbers -> diffusers block numbers, on the names only.
    names = {n: n for n in groups}
    sgm = [n for n in groups if n.startswith("lora_unet_") and any(p in n for p in _SGM)]
    if sgm:
        layers = getattr(unet_config, "layers_per_block", None)
        if layers is None:
            layers = DEFAULT_LAYERS_PER_BLOCK
            warnings.append(
                f"SGM block names mapped assuming layers_per_block={layers} (true of SD 1.x/2.x/XL); "
                "pass the UNet config to map them for another UNet"
            )
        if not isinstance(layers, int):
            layers = int(layers)
        unet_names = {n: n for n in groups if n.startswith("lora_unet_")}
        try:
            mapped = _maybe_map_sgm_blocks_to_diffusers(dict(unet_names), SimpleNamespace(layers_per_block=layers))
        except (ValueError, IndexError) as e:
            raise AdapterFormatError(f"{where}: SGM block names could not be mapped: {e}") from e
        # The map renames keys and keeps values, and values are the original names.
        names.update({orig: new for new, orig in mapped.items()})
        dropped = set(unet_names) - set(mapped.values())
        if dropped:
            raise AdapterFormatError(
                f"{where}: file mixes SGM and diffusers block names; diffusers would drop: {list_keys(dropped)}"
            )

    modules: dict[str, LoraModule] = {}
    for name, g in groups.items():
        component = _component_of(name)
        down, up = g[".lora_down.weight"], g[".lora_up.weight"]
        path = _module_path(component, names[name], down, up, where)
        target = canonical_target(component, path)
        rank = int(down.shape[0])
        alpha_t = g.get(".alpha")
        if alpha_t is None:
            alpha = float(rank)
        else:
            alpha = float(alpha_t.float().item())
            if alpha == 0.0:
                warnings.append(f"{name}: alpha 0 read as kohya does (alpha = rank, scale 1); A1111 would apply scale 0")
                alpha = float(rank)
        if target in modules:
            raise AdapterFormatError(f"{where}: two kohya modules map to {target} (one is {name})")
        try:
            modules[target] = LoraModule(down=down, up=up, alpha=alpha)
        except ValueError as e:
            raise AdapterFormatError(f"{where}: {name}: {e}") from e
    missing_alpha = [n for n, g in groups.items() if ".alpha" not in g]
    if missing_alpha and len(missing_alpha) != len(groups):
        warnings.append(f"{len(missing_alpha)} of {len(groups)} modules have no alpha; they use scale 1 (A1111's rule)")
    return CanonicalAdapter(modules=modules, embeddings=embeddings, metadata=dict(metadata), source_format=NAME, warnings=warnings)
