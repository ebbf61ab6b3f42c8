"""The weights of a diffusers model folder, read from its safetensors files (no model built).

`fuse` and `extract` work on files, not on loaded models: they need only the named weights, and
this way they keep each file's dtype, sharding and metadata as they were. Components are the
sub-folders `unet/`, `text_encoder/`, `text_encoder_2/`; a component whose weights are only in
pickle files (`.bin`) is refused.

Some adapter formats also need the model's structure, not only its weights: `module_tree_of`
(cloneofsimo's module order) and `unet_config_of` (kohya SDXL's SGM block names). They read the
components' `config.json` only.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Iterator, Mapping
from pathlib import Path
from types import SimpleNamespace

import torch
from safetensors import safe_open

from .canonical import COMPONENTS
from .errors import AdapterFormatError
from .files import PICKLE_SUFFIXES


def component_files(folder: str | os.PathLike) -> dict[str, list[Path]]:
    """{component: its .safetensors files} for the components present in a model folder."""
    folder = Path(folder)
    if not folder.is_dir():
        raise AdapterFormatError(f"{folder}: not a model folder")
    out = {}
    for component in COMPONENTS:
        sub = folder / component
        if not sub.is_dir():
            continue
        files = sorted(sub.glob("*.safetensors"))
        if not files:
            pickles = sorted(p.name for p in sub.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES)
            if pickles:
                raise AdapterFormatError(f"{sub}: weights only as pickles ({', '.join(pickles)}); safetensors only")
            continue
        out[component] = files
    if not out:
        raise AdapterFormatError(f"{folder}: no unet/, text_encoder/ or text_encoder_2/ with safetensors weights")
    return out


def read_weights(folder: str | os.PathLike, components=None) -> dict[str, torch.Tensor]:
    """{"<component>.<parameter name>": tensor} over the folder's safetensors files."""
    out = {}
    for component, files in component_files(folder).items():
        if components is not None and component not in components:
            continue
        for path in files:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                for key in f.keys():
                    out[f"{component}.{key}"] = f.get_tensor(key)
    return out


def weight_shapes(folder: str | os.PathLike) -> dict[str, tuple[int, ...]]:
    """Shapes only, from the headers: for validating an adapter against a folder cheaply."""
    out = {}
    for component, files in component_files(folder).items():
        for path in files:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                for key in f.keys():
                    out[f"{component}.{key}"] = tuple(f.get_slice(key).get_shape())
    return out


def unet_config_of(folder: str | os.PathLike) -> SimpleNamespace:
    """The UNet's config (`layers_per_block`, ...) as the kohya parser reads it (attributes)."""
    return SimpleNamespace(**json.loads((Path(folder) / "unet" / "config.json").read_text(encoding="utf-8")))


def module_tree_of(folder: str | os.PathLike, component: str) -> list[tuple[str, str, bool]]:
    """`formats.cloneofsimo.module_tree` of a folder's `unet` or `text_encoder`, the module list a
    cloneofsimo file's indices count in. The module is built from its config on the `meta` device:
    no weight is read or allocated, and it is dropped once listed."""
    from .formats.cloneofsimo import module_tree

    sub = Path(folder) / component
    if component == "unet":
        from diffusers import UNet2DConditionModel

        with torch.device("meta"):
            model = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(sub))
    elif component == "text_encoder":
        from transformers import CLIPTextConfig, CLIPTextModel

        with torch.device("meta"):
            model = CLIPTextModel(CLIPTextConfig.from_pretrained(sub))
    else:
        raise ValueError(f"module trees are built for 'unet' and 'text_encoder' (cloneofsimo's models), not {component!r}")
    return module_tree(model)


class FolderModuleTrees(Mapping):
    """{"unet": tree, "text_encoder": tree} of a model folder for `load_adapter(module_trees=...)`,
    each built on first read: only cloneofsimo files read them, and even on `meta` a UNet takes
    a moment to build. A component the folder lacks is refused by name, not left to a KeyError
    that the parser would report as "no module list given"."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        self._trees: dict[str, tuple[tuple[str, str, bool], ...]] = {}
        self._lock = threading.Lock()  # the server parses uploads on several threads

    def __getitem__(self, component: str):
        if component not in ("unet", "text_encoder"):
            raise KeyError(component)
        with self._lock:
            if component not in self._trees:
                if not (self.folder / component / "config.json").is_file():
                    raise AdapterFormatError(f"{self.folder}: no {component}/config.json to list the {component}'s modules from")
                self._trees[component] = tuple(module_tree_of(self.folder, component))
            return self._trees[component]

    def __iter__(self) -> Iterator[str]:
        return iter(("unet", "text_encoder"))

    def __len__(self) -> int:
        return 2
