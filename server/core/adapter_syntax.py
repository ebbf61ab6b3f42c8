"""Adapter references in requests: A1111's `<lora:name:weight>` prompt tags and per-step weight
schedules (SD.Next / sd-webui-loractl's `w@f,w@f` form).

Tags are stripped from the text the model sees; A1111 keeps them in the infotext prompt, and
so do we. Forms accepted:
    <lora:name>                weight 1.0
    <lora:name:0.8>            weight 0.8
    <lora:name:0@0,1@0.5>      a weight schedule
A1111's separate text-encoder / UNet multipliers (`<lora:name:te:unet>`, `te=`, `unet=`) are
refused with the reason rather than read as something else. `<hypernet:...>` and other extra
networks are left in the prompt untouched (we do not serve them).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from .errors import InvalidArgument

_TAG = re.compile(r"<lora:([^>]*)>")


@dataclass(frozen=True)
class WeightSchedule:
    """Points (fraction of the steps done, weight), sorted; linear in between, held outside."""

    points: tuple[tuple[float, float], ...]
    text: str

    def at(self, fraction: float) -> float:
        pts = self.points
        if fraction <= pts[0][0]:
            return pts[0][1]
        for (f0, w0), (f1, w1) in zip(pts, pts[1:]):
            if fraction <= f1:
                return w0 if f1 == f0 else w0 + (w1 - w0) * (fraction - f0) / (f1 - f0)
        return pts[-1][1]


def _number(text: str, field: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise InvalidArgument(field, f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise InvalidArgument(field, f"must be a finite number, got {text!r}")
    return value


def parse_schedule(text: str, field: str = "weight_schedule") -> WeightSchedule:
    """`"0@0,1@0.5"` -> WeightSchedule; errors name the field and the bad part."""
    points = []
    for part in text.split(","):
        weight, sep, at = part.strip().partition("@")
        if not sep:
            raise InvalidArgument(field, f"{part.strip()!r} is not weight@fraction (e.g. \"0@0,1@0.5\")")
        fraction = _number(at.strip(), field)
        if not 0.0 <= fraction <= 1.0:
            raise InvalidArgument(field, f"{part.strip()!r}: the step fraction must be in 0..1")
        points.append((fraction, _number(weight.strip(), field)))
    points.sort()
    return WeightSchedule(tuple(points), text)


@dataclass(frozen=True)
class PromptAdapter:
    name: str
    weight: float
    schedule: WeightSchedule | None


def extract_lora_tags(prompt: str) -> tuple[str, list[PromptAdapter]]:
    """(prompt without the tags, the tags in prompt order)."""
    found: list[PromptAdapter] = []
    for match in _TAG.finditer(prompt):
        tag = match.group(0)
        parts = match.group(1).split(":")
        name = parts[0].strip()
        if not name:
            raise InvalidArgument("prompt", f"{tag}: no adapter name")
        if len(parts) > 2 or any("=" in p for p in parts[1:]):
            raise InvalidArgument("prompt", f"{tag}: separate text-encoder/UNet multipliers are not supported; use <lora:{name}:weight>")
        weight, schedule = 1.0, None
        if len(parts) == 2 and parts[1].strip():
            value = parts[1].strip()
            if "@" in value:
                schedule = parse_schedule(value, "prompt")
            else:
                weight = _number(value, "prompt")
        found.append(PromptAdapter(name, weight, schedule))
    # A1111 removes the tag and leaves the surrounding text as it was.
    return _TAG.sub("", prompt), found
