"""LyCORIS (LoHa, LoKr, LoCon-Tucker, full diff, OFT, IA3, GLoRA, norm) and DoRA: refused.

They share kohya's prefixes but not its math: LoHa's delta is a Hadamard product of two
low-rank products, LoKr's a Kronecker product, DoRA's depends on the base weight's norm. None is
`up @ down`, so treating them as LoRA would apply the wrong delta; dropping their keys would
apply nothing. `detect` recognises them so the refusal names the kind and the keys.
Suffixes from KohakuBlueleaf/LyCORIS and A1111's `network_*.py` modules.
"""

from __future__ import annotations

from ..errors import AdapterFormatError, list_keys

NAME = "lycoris"
_KINDS = {
    "LoHa": ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2"),
    "LoKr": ("lokr_w1", "lokr_w2", "lokr_w1_a", "lokr_w1_b", "lokr_w2_a", "lokr_w2_b", "lokr_t2"),
    "LoCon (Tucker)": ("lora_mid",),
    "full diff": ("diff", "diff_b"),
    "OFT": ("oft_blocks", "oft_diag"),
    "IA3": ("on_input",),
    "GLoRA": ("a1.weight", "a2.weight", "b1.weight", "b2.weight"),
    "norm": ("w_norm", "b_norm"),
    "DoRA": ("dora_scale",),
}


def _kinds_of(keys) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for key in keys:
        _, _, suffix = key.partition(".")
        stem = suffix.removesuffix(".weight") if suffix.endswith(".weight") and suffix.count(".") > 0 else suffix
        for kind, suffixes in _KINDS.items():
            if suffix in suffixes or stem in suffixes:
                found.setdefault(kind, []).append(key)
    return found


def detect(state_dict, metadata) -> bool:
    return bool(_kinds_of(state_dict.keys()))


def parse(state_dict, metadata, *, where: str = "adapter", **_):
    found = _kinds_of(state_dict.keys())
    kinds = ", ".join(sorted(found))
    keys = [k for ks in found.values() for k in ks]
    raise AdapterFormatError(
        f"{where}: {kinds} (LyCORIS-family) weights are not plain LoRA (delta is not up @ down) and are "
        f"not supported; keys: {list_keys(keys)}"
    )
