"""diffusers LoRA files (`pytorch_lora_weights.safetensors`), current and older spellings.

Current (PEFT backend): `unet.<path>.lora_A.weight` / `.lora_B.weight`, `text_encoder.<path>…`,
`text_encoder_2.<path>…`, with the peft `LoraConfig` of each component in the safetensors
metadata under `lora_adapter_metadata` as JSON, keys prefixed by the component
(`{"unet.r": 4, "unet.lora_alpha": 8, "unet.rank_pattern": {...}, ...}`); see diffusers
`LoraBaseMixin.write_lora_layers` and `_pack_dict_with_prefix`.
Older: `unet.<path>.to_q.lora.down.weight`, `unet.<path>.processor.to_q_lora.down.weight`,
`text_encoder.<path>.q_proj.lora_linear_layer.down.weight`; the oldest `save_attn_procs` files
have no `unet.` prefix at all.

Key maps are diffusers' own, chained as its loaders chain them: UNet keys through
`convert_unet_state_dict_to_peft` (`PeftAdapterMixin.load_lora_adapter`), text-encoder keys
through `convert_state_dict_to_diffusers` then `convert_state_dict_to_peft`
(`_load_lora_into_text_encoder`).

Scale: with metadata, peft's rule (lora_alpha / r, rank_pattern, alpha_pattern, rsLoRA). Without
it, diffusers' rule: alpha = rank (scale 1), unless a `<path>.alpha` tensor is stored (some
third-party trainers write them; diffusers' SD loader would reject such a file outright).
"""

from __future__ import annotations

import json

from diffusers.utils.state_dict_utils import (
    convert_state_dict_to_diffusers,
    convert_state_dict_to_peft,
    convert_unet_state_dict_to_peft,
)

from ..canonical import COMPONENTS, CanonicalAdapter
from ..errors import AdapterFormatError, list_keys
from ._common import build_modules, pair_peft_keys, peft_alpha_rule, refuse_dora_and_bias

NAME = "diffusers"
METADATA_KEY = "lora_adapter_metadata"  # diffusers.loaders.lora_base.LORA_ADAPTER_METADATA_KEY
_MARKERS = (".lora_A.weight", ".lora_B.weight", ".lora.down.weight", ".lora.up.weight", "lora_linear_layer.", "_lora.down.weight", "_lora.up.weight")
# Top-level UNet modules: how an unprefixed (save_attn_procs) key is recognised as UNet.
_UNET_ROOTS = ("down_blocks.", "mid_block.", "up_blocks.", "conv_in.", "conv_out.", "time_embedding.", "add_embedding.")


def detect(state_dict, metadata) -> bool:
    keys = list(state_dict)
    if not keys or any(k.startswith(("lora_unet_", "lora_te", "base_model.model.")) or ":" in k for k in keys):
        return False
    return any(any(m in k for m in _MARKERS) for k in keys)


def _split_components(state_dict, where):
    parts: dict[str, dict] = {c: {} for c in COMPONENTS}
    alphas: dict[str, dict[str, float]] = {c: {} for c in COMPONENTS}
    unknown = []
    for key, value in state_dict.items():
        component, _, rest = key.partition(".")
        if component not in COMPONENTS:
            if key.startswith(_UNET_ROOTS):
                component, rest = "unet", key
            else:
                unknown.append(key)
                continue
        if rest.endswith(".alpha"):
            alphas[component][rest[: -len(".alpha")]] = float(value.float().item())
        else:
            parts[component][rest] = value
    if unknown:
        raise AdapterFormatError(f"{where}: keys outside unet / text_encoder / text_encoder_2: {list_keys(unknown)}")
    return parts, alphas


def _to_peft(component: str, sd: dict, where: str) -> dict:
    if component == "unet":
        return convert_unet_state_dict_to_peft(sd)
    try:
        return convert_state_dict_to_peft(convert_state_dict_to_diffusers(sd))
    except ValueError as e:  # "Could not automatically infer state dict type"
        raise AdapterFormatError(f"{where}: {component} keys in no diffusers spelling: {list_keys(sd)} ({e})") from e


def component_configs(metadata) -> dict[str, dict]:
    """{component: LoraConfig dict} from diffusers' `lora_adapter_metadata`, if present."""
    raw = (metadata or {}).get(METADATA_KEY)
    if not raw:
        return {}
    packed = json.loads(raw)
    out: dict[str, dict] = {}
    for key, value in packed.items():
        component, _, field = key.partition(".")
        if component in COMPONENTS and field:
            out.setdefault(component, {})[field] = value
    return out


def parse(state_dict, metadata, *, where: str = "diffusers file", **_) -> CanonicalAdapter:
    refuse_dora_and_bias(state_dict.keys(), where)
    parts, stored_alphas = _split_components(state_dict, where)
    configs = component_configs(metadata)
    modules = {}
    for component in COMPONENTS:
        if not parts[component]:
            continue
        pairs = pair_peft_keys(_to_peft(component, parts[component], where), f"{where} ({component})")
        if component in configs:
            alpha_of = peft_alpha_rule(configs[component], f"{where} ({component} metadata)")
        else:
            alphas = stored_alphas[component]
            extra = set(alphas) - set(pairs)
            if extra:
                raise AdapterFormatError(f"{where}: .alpha for modules without weights: {list_keys(extra)}")

            def alpha_of(path, rank, alphas=alphas):
                return alphas.get(path, float(rank))

        modules.update(build_modules(component, pairs, alpha_of, where))
    return CanonicalAdapter(modules=modules, metadata=dict(metadata or {}), source_format=NAME)
