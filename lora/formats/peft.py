"""PEFT adapter folders: `adapter_model.safetensors` + `adapter_config.json`.

Written by `PeftModel.save_pretrained`: keys `base_model.model.<path>.lora_A.weight` /
`.lora_B.weight` (peft drops the adapter name on save), and the `LoraConfig` as JSON
(`peft_type: "LORA"`, `r`, `lora_alpha`, `use_rslora`, `rank_pattern`, `alpha_pattern`,
`use_dora`, `target_modules`, ...). Scale as peft's `LoraLayer.update_layer`: lora_alpha / r,
or lora_alpha / √r with use_rslora, per module after the patterns.

A folder adapts one model and does not say which, so the component is an argument; when it is
not given, CLIP's module names (`self_attn`, `mlp.fc1`, `text_model`) mean text_encoder and
anything else the UNet.
"""

from __future__ import annotations

from ..canonical import CanonicalAdapter
from ..errors import AdapterFormatError
from ._common import build_modules, pair_peft_keys, peft_alpha_rule

NAME = "peft"
PREFIX = "base_model.model."
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
_CLIP_HINTS = (".self_attn.", ".mlp.fc1", ".mlp.fc2", "text_model.", "text_projection")


def detect(state_dict, metadata) -> bool:
    return bool(state_dict) and all(k.startswith(PREFIX) for k in state_dict)


def guess_component(paths) -> str:
    return "text_encoder" if any(h in p for p in paths for h in _CLIP_HINTS) else "unet"


def parse(state_dict, metadata, *, config: dict | None = None, component: str | None = None, where: str = "PEFT adapter", **_) -> CanonicalAdapter:
    if config is None:
        raise AdapterFormatError(
            f"{where}: PEFT keys (base_model.model.…) without {CONFIG_NAME}; lora_alpha and r are unknown, "
            "so the scale is unknown. Load the adapter folder, not the bare weights file."
        )
    peft_type = str(config.get("peft_type", "LORA")).upper()
    if peft_type != "LORA":
        raise AdapterFormatError(f"{where}: peft_type {peft_type} is not LoRA")
    if config.get("modules_to_save"):
        raise AdapterFormatError(f"{where}: modules_to_save {config['modules_to_save']} holds full weights, not LoRA")
    stripped = {k[len(PREFIX):]: v for k, v in state_dict.items()}
    pairs = pair_peft_keys(stripped, where)
    component = component or guess_component(pairs)
    modules = build_modules(component, pairs, peft_alpha_rule(config, where), where)
    meta = {k: str(v) for k, v in (metadata or {}).items()}
    return CanonicalAdapter(modules=modules, metadata=meta, source_format=NAME)
