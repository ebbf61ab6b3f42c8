"""A1111's "parameters" text: the generation settings embedded in every image.

Format (A1111 writes it, and A1111 / SD.Next / civitai read it back):

    <prompt>
    Negative prompt: <negative prompt>          (omitted when empty)
    Steps: 20, Sampler: Euler a, CFG scale: 7.0, Seed: 42, Size: 512x512, Model hash: 0123456789, Model: name, Version: impasto 0.1.0

Values that contain a comma, colon or quote are JSON-quoted, as A1111 does.
"""

from __future__ import annotations

import json
import re

from impasto import __version__

_NEEDS_QUOTES = re.compile(r'[,:"]')


def _value(value) -> str:
    text = str(value)
    return json.dumps(text, ensure_ascii=False) if _NEEDS_QUOTES.search(text) else text


def _number(x: float) -> str:
    return f"{x:g}" if x != int(x) else f"{x:.1f}"


def format_infotext(
    *,
    prompt: str,
    negative_prompt: str,
    num_steps: int,
    sampler_display_name: str,
    guidance_scale: float,
    seed: int,
    width: int,
    height: int,
    model_hash: str,
    model_name: str,
    extra: dict[str, str] | None = None,
) -> str:
    fields = {
        "Steps": num_steps,
        "Sampler": sampler_display_name,
        "CFG scale": _number(guidance_scale),
        "Seed": seed,
        "Size": f"{width}x{height}",
        "Model hash": model_hash,
        "Model": model_name,
        **(extra or {}),
        "Version": f"impasto {__version__}",
    }
    lines = [prompt]
    if negative_prompt:
        lines.append(f"Negative prompt: {negative_prompt}")
    lines.append(", ".join(f"{k}: {_value(v)}" for k, v in fields.items()))
    return "\n".join(lines)


_FIELD = re.compile(r'\s*([\w ]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')


def parse_infotext(text: str) -> dict[str, str]:
    """Read infotext back into a dict (prompt, negative prompt and the fields), as A1111 does."""
    lines = text.strip().split("\n")
    last = lines[-1] if len(lines) > 1 or ": " in lines[-1] else ""
    body = lines[:-1] if last else lines
    prompt_lines, negative_lines, in_negative = [], [], False
    for line in body:
        if line.startswith("Negative prompt:"):
            in_negative = True
            line = line[len("Negative prompt:") :].lstrip()
        (negative_lines if in_negative else prompt_lines).append(line)
    result = {"Prompt": "\n".join(prompt_lines), "Negative prompt": "\n".join(negative_lines)}
    for key, value in _FIELD.findall(last):
        value = value.strip()
        result[key.strip()] = json.loads(value) if value.startswith('"') else value
    return result
