"""Pieces the format parsers share: PEFT-style key pairing and peft's pattern rule."""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping

import torch

from ..canonical import LoraModule, canonical_target
from ..errors import AdapterFormatError, list_keys

_A = ".lora_A.weight"
_B = ".lora_B.weight"


def refuse_dora_and_bias(keys, where: str) -> None:
    """DoRA and LoRA-bias are not `up @ down` deltas; say so instead of dropping the keys."""
    dora = [k for k in keys if "lora_magnitude_vector" in k or k.endswith(".dora_scale")]
    if dora:
        raise AdapterFormatError(
            f"{where}: DoRA adapters are not supported (their delta depends on the base weight's "
            f"norm, not only on up @ down); keys: {list_keys(dora)}"
        )
    bias = [k for k in keys if k.endswith(".lora_B.bias")]
    if bias:
        raise AdapterFormatError(f"{where}: LoRA bias terms (peft lora_bias=True) are not supported; keys: {list_keys(bias)}")


def pair_peft_keys(state_dict: Mapping[str, torch.Tensor], where: str) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{module path: (down, up)} from `<path>.lora_A.weight` / `<path>.lora_B.weight` keys.

    Any other key, or half a pair, is an error that lists the keys.
    """
    refuse_dora_and_bias(state_dict.keys(), where)
    downs = {k[: -len(_A)]: v for k, v in state_dict.items() if k.endswith(_A)}
    ups = {k[: -len(_B)]: v for k, v in state_dict.items() if k.endswith(_B)}
    unknown = [k for k in state_dict if not (k.endswith(_A) or k.endswith(_B))]
    if unknown:
        raise AdapterFormatError(f"{where}: unknown keys: {list_keys(unknown)}")
    half = sorted(set(downs) ^ set(ups))
    if half:
        raise AdapterFormatError(f"{where}: modules with only one of lora_A / lora_B: {list_keys(half)}")
    return {m: (downs[m], ups[m]) for m in downs}


def build_modules(
    component: str,
    pairs: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
    alpha_of: Callable[[str, int], float],
    where: str,
) -> dict[str, LoraModule]:
    """Canonical modules for one component; `alpha_of(module path, rank)` gives each alpha."""
    out: dict[str, LoraModule] = {}
    for path, (down, up) in pairs.items():
        target = canonical_target(component, path)
        if target in out:
            raise AdapterFormatError(f"{where}: two entries for {target}")
        try:
            out[target] = LoraModule(down=down, up=up, alpha=float(alpha_of(path, int(down.shape[0]))))
        except ValueError as e:
            raise AdapterFormatError(f"{where}: {target}: {e}") from e
    return out


def pattern_key(patterns, module_path: str) -> str | None:
    """The first of peft's `rank_pattern` / `alpha_pattern` keys that matches a module path.

    Same rule as `peft.utils.other.get_pattern_key` (peft 0.21.2): key K matches path P when
    `re.match(rf"(.*\\.)?({K})$", P)`. Re-stated here rather than imported because peft is an
    optional extra and the server must parse diffusers files without it; a unit test pins the
    two to agree.
    """
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", module_path):
            return key
    return None


def peft_alpha_rule(config: Mapping, where: str) -> Callable[[str, int], float]:
    """alpha_of(path, rank) for a peft LoraConfig dict: lora_alpha/r, rsLoRA and patterns.

    The canonical scale is alpha/rank, so rsLoRA's lora_alpha/√r becomes alpha = lora_alpha·√r.
    A rank that disagrees with the config (after rank_pattern) is an error: peft itself would
    fail to load such a file.
    """
    r = int(config.get("r", 8))
    lora_alpha = float(config.get("lora_alpha", 8))
    rank_pattern = dict(config.get("rank_pattern") or {})
    alpha_pattern = dict(config.get("alpha_pattern") or {})
    rslora = bool(config.get("use_rslora", False))
    # Settings that change what the weights mean; refusing beats applying the wrong delta.
    for flag, why in (
        ("use_dora", "DoRA adapters are not supported"),
        ("fan_in_fan_out", "transposed (Conv1D) weights are not used by SD-family models"),
        ("lora_bias", "LoRA bias terms are not supported"),
        ("target_parameters", "LoRA on bare parameters is not supported"),
    ):
        if config.get(flag):
            raise AdapterFormatError(f"{where}: {flag} is set; {why}")

    def alpha_of(path: str, rank: int) -> float:
        rk = pattern_key(rank_pattern, path)
        declared = int(rank_pattern[rk]) if rk is not None else r
        if declared != rank:
            raise AdapterFormatError(f"{where}: {path} has rank {rank} but the config says {declared}")
        ak = pattern_key(alpha_pattern, path)
        a = float(alpha_pattern[ak]) if ak is not None else lora_alpha
        return a * math.sqrt(rank) if rslora else a

    return alpha_of
