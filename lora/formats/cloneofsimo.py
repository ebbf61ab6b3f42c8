"""cloneofsimo/lora files (`save_safeloras_with_embeds`), read from the project's public code.

Keys `<model>:<i>:up` / `<model>:<i>:down` for model `unet` / `text_encoder`; metadata
`<model>` is the JSON list of target class names (`CrossAttention`, `Attention`, `GEGLU`;
`ResnetBlock2D` in the extended injector; `CLIPAttention`), `<model>:<i>:rank` the rank, and each
textual-inversion token is a tensor keyed by the token with metadata value `<embed>`.
`up` is already multiplied by the injector's scale (`realize_as_lora`), so alpha = rank here.

There are no layer names: `<i>` counts modules in the order the injector walks them
(`_find_modules_v2`): for each module of the model, in `named_modules()` order, whose class name
is a target, each of its descendants (in the same order) that is a Linear or Conv2d. The base
model's module list is therefore needed to parse; `module_tree(model)` makes one, and
`model_folder.module_tree_of(folder, component)` makes one from a model folder's configs.
No installed library writes this format; the tests build files from this description.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence

import torch

from ..canonical import CanonicalAdapter, LoraModule, canonical_target
from ..errors import AdapterFormatError, list_keys

NAME = "cloneofsimo"
EMBED_FLAG = "<embed>"
MODELS = ("unet", "text_encoder")


class ModuleTreesNeeded(AdapterFormatError):
    """A cloneofsimo file was parsed without the base model's module list; callers that have
    their own way to get one (the CLI's `--model`) catch this to say so."""


ModuleTree = Sequence[tuple[str, str, bool]]  # (qualified name, class name, is Linear or Conv2d)


def module_tree(model: torch.nn.Module) -> list[tuple[str, str, bool]]:
    """The (name, class name, is Linear/Conv2d) list `parse` needs, in `named_modules()` order."""
    return [
        (name, type(m).__name__, isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)))
        for name, m in model.named_modules()
    ]


# diffusers renamed its attention class `CrossAttention` to `Attention`; files trained
# before that name `CrossAttention`, which no module of today's diffusers is called. Both names are
# matched as one class, on the tree's side too, so a tree listed under either diffusers fits.
CLASS_ALIASES = {"CrossAttention": "Attention"}


def _same_class(name: str) -> str:
    return CLASS_ALIASES.get(name, name)


def walk_order(tree: ModuleTree, target_classes) -> list[str]:
    """Module names in the injector's order (see the module docstring)."""
    targets = {_same_class(c) for c in target_classes}
    out = []
    for i, (name, cls, _) in enumerate(tree):
        if _same_class(cls) not in targets:
            continue
        # named_modules() is a pre-order walk, so an ancestor's subtree is the run of entries
        # after it whose names extend its own.
        prefix = name + "." if name else ""
        for sub, _sub_cls, is_layer in tree[i:]:
            if sub != name and not sub.startswith(prefix):
                break
            if is_layer:
                out.append(sub)
    return out


def detect(state_dict, metadata) -> bool:
    metadata = metadata or {}
    has_indexed = any(k.split(":")[0] in MODELS and k.count(":") == 2 for k in state_dict)
    return has_indexed or (bool(state_dict) and all(metadata.get(k) == EMBED_FLAG for k in state_dict))


def parse(state_dict, metadata, *, module_trees: Mapping[str, ModuleTree] | None = None, where: str = "cloneofsimo file", **_) -> CanonicalAdapter:
    metadata = dict(metadata or {})
    embeddings = {}
    per_model: dict[str, dict[int, dict[str, torch.Tensor]]] = {}
    unknown = []
    for key, value in state_dict.items():
        if metadata.get(key) == EMBED_FLAG:
            embeddings[key] = {"text_encoder": value.reshape(-1, value.shape[-1])}
            continue
        parts = key.split(":")
        if len(parts) != 3 or parts[0] not in MODELS or not parts[1].isdigit() or parts[2] not in ("up", "down"):
            unknown.append(key)
            continue
        per_model.setdefault(parts[0], {}).setdefault(int(parts[1]), {})[parts[2]] = value
    if unknown:
        raise AdapterFormatError(f"{where}: unknown keys (not <model>:<i>:up/down or an <embed> token): {list_keys(unknown)}")

    modules: dict[str, LoraModule] = {}
    for model, entries in per_model.items():
        if model not in metadata:
            raise AdapterFormatError(f"{where}: no metadata '{model}' listing the target classes")
        targets = json.loads(metadata[model])
        tree = (module_trees or {}).get(model)
        if tree is None:
            raise ModuleTreesNeeded(
                f"{where}: '{model}' entries are indexed by module order; parsing needs the base "
                f"{model}'s module list (module_trees={{'{model}': module_tree({model})}})"
            )
        order = walk_order(tree, targets)
        if sorted(entries) != list(range(len(entries))):
            raise AdapterFormatError(f"{where}: '{model}' indices are not 0..{len(entries) - 1}")
        if len(entries) != len(order):
            raise AdapterFormatError(
                f"{where}: '{model}' has {len(entries)} modules but the base model has {len(order)} "
                f"Linear/Conv2d modules under {targets}; it was made for another architecture"
            )
        for i, path in enumerate(order):
            e = entries[i]
            if "up" not in e or "down" not in e:
                raise AdapterFormatError(f"{where}: {model}:{i} lacks up or down")
            down, up = e["down"], e["up"]
            try:
                modules[canonical_target(model, path)] = LoraModule(down=down, up=up, alpha=float(down.shape[0]))
            except ValueError as err:
                raise AdapterFormatError(f"{where}: {model}:{i} ({path}): {err}") from err
    return CanonicalAdapter(modules=modules, embeddings=embeddings, metadata=metadata, source_format=NAME)
