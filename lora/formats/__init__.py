"""One module per file format, each with `detect(state_dict, metadata) -> bool` and
`parse(state_dict, metadata, **context) -> CanonicalAdapter`.

`detect_format` tries them in a fixed order: the refusals first (LyCORIS and DoRA share kohya's
prefixes), then formats whose keys cannot be confused (cloneofsimo's `:`, PEFT's
`base_model.model.`, kohya's `lora_unet_`), diffusers, and last the standalone textual-inversion
files (`embedding`), which a single tensor is enough to look like.
"""

from __future__ import annotations

from ..canonical import CanonicalAdapter
from ..errors import AdapterFormatError, list_keys
from . import cloneofsimo, diffusers, embedding, kohya, lycoris, peft

FORMATS = {m.NAME: m for m in (lycoris, cloneofsimo, peft, kohya, diffusers, embedding)}


def detect_format(state_dict, metadata=None) -> str:
    """The name of the format of a state dict; an error listing sample keys if none fits."""
    if not state_dict:
        raise AdapterFormatError("the file holds no tensors")
    for name, module in FORMATS.items():
        if module.detect(state_dict, metadata or {}):
            return name
    raise AdapterFormatError(f"not a LoRA or embedding format we know (kohya, diffusers, PEFT, cloneofsimo, textual inversion); keys: {list_keys(state_dict, 8)}")


def parse_state_dict(state_dict, metadata=None, *, format: str | None = None, **context) -> CanonicalAdapter:
    """Parse with the named format, or the detected one. `context` goes to the parser:
    `unet_config` (kohya SGM names), `module_trees` (cloneofsimo), `config` / `component` (PEFT),
    `token_name` (the token of an A1111/kohya embedding file), `where` (the name errors use for the
    source)."""
    name = format or detect_format(state_dict, metadata)
    if name not in FORMATS:
        raise AdapterFormatError(f"unknown format {name!r}; known: {', '.join(FORMATS)}")
    return FORMATS[name].parse(dict(state_dict), dict(metadata or {}), **context)


__all__ = ["FORMATS", "detect_format", "parse_state_dict"]
