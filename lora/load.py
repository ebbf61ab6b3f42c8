"""`load_adapter(path)`: any supported adapter file or folder -> CanonicalAdapter."""

from __future__ import annotations

import json
import os
from pathlib import Path

from .canonical import CanonicalAdapter
from .errors import AdapterFormatError
from .files import PICKLE_SUFFIXES, read_safetensors
from .formats import parse_state_dict
from .formats import peft as peft_format
from .hashing import addnet_hash


def _weights_file_of_folder(folder: Path) -> Path:
    """The one safetensors file in an adapter folder; pickles beside it are refused by name."""
    if (folder / peft_format.WEIGHTS_NAME).is_file():
        return folder / peft_format.WEIGHTS_NAME
    files = sorted(p for p in folder.iterdir() if p.suffix == ".safetensors")
    if len(files) == 1:
        return files[0]
    if not files:
        pickles = sorted(p.name for p in folder.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES)
        detail = f"; pickle files are refused: {', '.join(pickles)}" if pickles else ""
        raise AdapterFormatError(f"{folder}: no .safetensors adapter file{detail}")
    raise AdapterFormatError(f"{folder}: several .safetensors files ({', '.join(p.name for p in files)}); name one")


def load_adapter(
    path: str | os.PathLike,
    *,
    format: str | None = None,
    unet_config=None,
    module_trees=None,
    component: str | None = None,
    token_name: str | None = None,
) -> CanonicalAdapter:
    """Read an adapter file (or PEFT / diffusers folder), detect its format, parse it.

    Only safetensors is read: `.bin` / `.pt` / `.ckpt` and files that are pickles inside are
    refused with a reason. Context some formats need:
    `unet_config` (has `layers_per_block`) for kohya SDXL's SGM block names (default 2, with a
    warning); `module_trees` ({"unet": module_tree(unet), ...}) for cloneofsimo files;
    `component` for a PEFT folder (default: guessed from its module names);
    `token_name` for an A1111/kohya embedding file, which does not hold its token (default: the
    file's stem, A1111's rule).
    """
    path = Path(path)
    config = None
    if path.is_dir():
        weights = _weights_file_of_folder(path)
        if (path / peft_format.CONFIG_NAME).is_file():
            config = json.loads((path / peft_format.CONFIG_NAME).read_text(encoding="utf-8"))
    else:
        weights = path
    tensors, metadata = read_safetensors(weights)
    if config is not None:
        metadata = {**metadata, "adapter_config": json.dumps(config, sort_keys=True)}
    adapter = parse_state_dict(
        tensors,
        metadata,
        format=format,
        unet_config=unet_config,
        module_trees=module_trees,
        component=component,
        config=config,
        token_name=token_name or weights.stem,
        where=str(path),
    )
    adapter.file_sha256 = addnet_hash(weights)
    return adapter
