"""Validate an adapter against a base model before anything is applied.

`named_weight_shapes` is the base model's weights as `{"<component>.<parameter name>": shape}`
(`named_weight_shapes_of({"unet": unet, "text_encoder": te})` builds it). Each target resolves to
one weight, tried in this order:
1. `<target>.weight` exactly;
2. the same with `text_model.` removed or added (transformers 5 flattens CLIPTextModel but not
   CLIPTextModelWithProjection; canonical targets always carry `text_model.`);
3. the weight whose name, with every `.` made `_`, equals the target's so made, if exactly one
   does: A1111's own rule (it names every module `lora_unet_` + name with `_`), which catches
   any module the diffusers key converter spelled differently from this model.
A target that resolves to nothing is an error listing every such target (never a silent partial
application), unless `allow_unmatched`, when they are counted in `warnings` for the caller to
report. A shape that differs is always an error naming the module and both shapes; the one
difference allowed is a 1×1 conv against a linear weight of the same (out, in), which A1111
also accepts (SD 1.x proj_in/proj_out are 1×1 convs, SD 2.x's are linear).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from .canonical import TEXT_ENCODERS, CanonicalAdapter, split_target
from .errors import AdapterMismatchError, list_keys


@dataclass
class MatchReport:
    """`resolved`: target -> base weight name; `shapes`: target -> base weight shape."""

    resolved: dict[str, str] = field(default_factory=dict)
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    unmatched: list[str] = field(default_factory=list)
    mismatched: list[str] = field(default_factory=list)  # "target: adapter (..) vs base (..)"
    unmatched_embedding_components: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    allow_unmatched: bool = False

    @property
    def errors(self) -> list[str]:
        errs = []
        if self.unmatched and not self.allow_unmatched:
            errs.append(f"{len(self.unmatched)} adapter targets not in the base model: {list_keys(self.unmatched)}")
        if self.mismatched:
            errs.append(f"shape mismatch with the base model: {'; '.join(self.mismatched[:20])}")
        if self.unmatched_embedding_components:
            errs.append(f"embeddings for text encoders the base model lacks: {', '.join(self.unmatched_embedding_components)}")
        return errs

    @property
    def ok(self) -> bool:
        return not self.errors

    def raise_for_errors(self) -> None:
        if self.errors:
            raise AdapterMismatchError("; ".join(self.errors))


def named_weight_shapes_of(components: Mapping[str, torch.nn.Module]) -> dict[str, tuple[int, ...]]:
    return {f"{c}.{n}": tuple(p.shape) for c, m in components.items() for n, p in m.named_parameters()}


def _flat(name: str) -> str:
    return name.replace(".", "_")


class TargetResolver:
    """Resolves canonical targets to base weight names (rules in the module docstring)."""

    def __init__(self, names):
        self.names = set(names)
        self._flat: dict[str, list[str]] = {}
        for n in self.names:
            if n.endswith(".weight"):
                self._flat.setdefault(_flat(n), []).append(n)

    def resolve(self, target: str) -> str | None:
        component, path = split_target(target)
        candidates = [f"{target}.weight"]
        if component in TEXT_ENCODERS:
            alt = path.removeprefix("text_model.") if path.startswith("text_model.") else "text_model." + path
            candidates.append(f"{component}.{alt}.weight")
        for c in candidates:
            if c in self.names:
                return c
        found = self._flat.get(_flat(f"{target}.weight"), [])
        if len(found) == 1:
            return found[0]
        return None


def shapes_compatible(adapter_shape: tuple[int, ...], base_shape: tuple[int, ...]) -> bool:
    a, b = tuple(adapter_shape), tuple(base_shape)
    if a == b:
        return True
    # 1x1 conv <-> linear of the same (out, in).
    return a[:2] == b[:2] and all(s == 1 for s in a[2:] + b[2:])


def match_targets(
    adapter: CanonicalAdapter,
    named_weight_shapes: Mapping[str, tuple[int, ...]],
    *,
    allow_unmatched: bool = False,
    raise_on_error: bool = False,
) -> MatchReport:
    """Resolve every target of `adapter` in the base model and check shapes. See module docstring."""
    resolver = TargetResolver(named_weight_shapes.keys())
    report = MatchReport(allow_unmatched=allow_unmatched)
    for target, module in adapter.modules.items():
        name = resolver.resolve(target)
        if name is None:
            report.unmatched.append(target)
            continue
        base_shape = tuple(named_weight_shapes[name])
        if not shapes_compatible(module.delta_shape, base_shape):
            report.mismatched.append(f"{target}: adapter {module.delta_shape} vs base {base_shape}")
            continue
        report.resolved[target] = name
        report.shapes[target] = base_shape
    components = {n.partition(".")[0] for n in named_weight_shapes}
    for token, per_component in adapter.embeddings.items():
        for component, vectors in per_component.items():
            if component not in components:
                report.unmatched_embedding_components.append(f"{token} -> {component}")
                continue
            # A vector stands in for a row of the token table, so its width is the encoder's
            # hidden size; a table we cannot find is an error, not a check skipped.
            table = resolver.resolve(f"{component}.text_model.embeddings.token_embedding")
            if table is None:
                report.mismatched.append(f"embedding {token!r}: the base model's {component} has no token table to check it against")
            elif named_weight_shapes[table][-1] != vectors.shape[-1]:
                report.mismatched.append(
                    f"embedding {token!r} has vectors of width {vectors.shape[-1]}, but the base model's {component} "
                    f"hidden size is {named_weight_shapes[table][-1]} (made for another model family)"
                )
    if report.unmatched and allow_unmatched:
        report.warnings.append(f"{len(report.unmatched)} adapter targets not in the base model were skipped: {list_keys(report.unmatched)}")
    if raise_on_error:
        report.raise_for_errors()
    return report
