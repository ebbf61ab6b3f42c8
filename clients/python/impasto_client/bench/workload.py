"""The request mix: named request classes with weights, from a JSON/TOML file or from flags.

A file (JSON, or TOML on Python >= 3.11) lists the classes:

    [[classes]]
    name = "fast"
    weight = 3
    steps = 4
    size = "64x64"
    sampler = "euler"

    [[classes]]
    name = "slow"
    steps = 30
    sampler = "dpmpp_2m"

A flag gives one class inline: `--class fast:steps=4,size=64x64,sampler=euler,weight=3`
(a prompt with commas belongs in a file). Keys: name, weight, steps, size (WxH), sampler,
num_images, guidance_scale, prompt, negative_prompt, priority. An unset key leaves the
field unset in the request, so the server's (model's) default applies.

Runs are reproducible: request i's class is drawn from a RNG seeded with the run's seed, and
its image seed is `seed + i`.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DEFAULT_PROMPT = "a red circle on a white background"


@dataclass(frozen=True)
class RequestClass:
    name: str
    weight: float = 1.0
    num_steps: int | None = None
    width: int = 0  # 0: the model's default size
    height: int = 0
    sampler: str = ""
    num_images: int = 1
    guidance_scale: float | None = None
    prompt: str = DEFAULT_PROMPT
    negative_prompt: str = ""
    priority: str = "interactive"

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("a request class needs a name")
        if not self.weight > 0:
            raise ValueError(f"class {self.name!r}: weight must be > 0, got {self.weight}")
        if self.num_steps is not None and self.num_steps < 1:
            raise ValueError(f"class {self.name!r}: steps must be >= 1, got {self.num_steps}")
        if self.num_images < 1:
            raise ValueError(f"class {self.name!r}: num_images must be >= 1, got {self.num_images}")
        if self.width < 0 or self.height < 0:
            raise ValueError(f"class {self.name!r}: size must be positive, got {self.width}x{self.height}")

    def generate_options(self) -> dict[str, Any]:
        """Keyword arguments for `ImpastoClient.generate` (all but the prompt and the seed)."""
        return {
            "negative_prompt": self.negative_prompt,
            "width": self.width,
            "height": self.height,
            "num_steps": self.num_steps,
            "guidance_scale": self.guidance_scale,
            "sampler": self.sampler,
            "num_images": self.num_images,
            "priority": self.priority,
        }


@dataclass(frozen=True)
class Workload:
    classes: tuple[RequestClass, ...]

    def __post_init__(self) -> None:
        if not self.classes:
            raise ValueError("a workload needs at least one request class")
        names = [c.name for c in self.classes]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"request class names must be unique; repeated: {duplicates}")

    def by_name(self, name: str) -> RequestClass:
        for c in self.classes:
            if c.name == name:
                return c
        raise KeyError(name)


@dataclass(frozen=True)
class PlannedRequest:
    index: int
    request_class: RequestClass
    seed: int


def plan_requests(workload: Workload, count: int, seed: int = 0, first_index: int = 0) -> list[PlannedRequest]:
    """`count` requests drawn from the mix by weight; the same (workload, count, seed) gives the same plan."""
    rng = random.Random(seed)
    weights = [c.weight for c in workload.classes]
    chosen = rng.choices(workload.classes, weights=weights, k=first_index + count)[first_index:]
    return [PlannedRequest(first_index + i, c, seed + first_index + i) for i, c in enumerate(chosen)]


# --- parsing ------------------------------------------------------------------------------
_KEYS = {"name", "weight", "steps", "size", "sampler", "num_images", "guidance_scale", "prompt", "negative_prompt", "priority"}


def parse_size(text: str) -> tuple[int, int]:
    try:
        width, height = (int(v) for v in str(text).lower().split("x"))
    except ValueError:
        raise ValueError(f"size must look like 64x64, got {text!r}") from None
    return width, height


def class_from_dict(data: dict[str, Any], where: str = "class") -> RequestClass:
    unknown = set(data) - _KEYS
    if unknown:
        raise ValueError(f"{where}: unknown keys {sorted(unknown)}; known: {sorted(_KEYS)}")
    if "name" not in data:
        raise ValueError(f"{where}: missing 'name'")
    width, height = parse_size(data["size"]) if "size" in data else (0, 0)
    try:
        return RequestClass(
            name=str(data["name"]),
            weight=float(data.get("weight", 1.0)),
            num_steps=int(data["steps"]) if "steps" in data else None,
            width=width,
            height=height,
            sampler=str(data.get("sampler", "")),
            num_images=int(data.get("num_images", 1)),
            guidance_scale=float(data["guidance_scale"]) if "guidance_scale" in data else None,
            prompt=str(data.get("prompt", DEFAULT_PROMPT)),
            negative_prompt=str(data.get("negative_prompt", "")),
            priority=str(data.get("priority", "interactive")),
        )
    except (TypeError, ValueError) as error:
        raise ValueError(f"{where}: {error}") from None


def parse_class_spec(text: str) -> RequestClass:
    """`NAME:key=value,key=value` (the --class flag) -> a RequestClass."""
    name, _, rest = text.partition(":")
    data: dict[str, Any] = {"name": name.strip()}
    for item in filter(None, (p.strip() for p in rest.split(","))):
        key, eq, value = item.partition("=")
        if not eq:
            raise ValueError(f"--class {text!r}: expected key=value, got {item!r}")
        data[key.strip()] = value.strip()
    return class_from_dict(data, where=f"--class {text!r}")


def load_workload(path: str | Path) -> Workload:
    path = Path(path)
    if path.suffix.lower() == ".toml":
        try:
            import tomllib
        except ImportError:  # Python 3.10: the client supports it, tomllib does not exist there
            raise ValueError(f"{path}: TOML needs Python >= 3.11; use a JSON file") from None
        data = tomllib.loads(path.read_text())
    elif path.suffix.lower() == ".json":
        data = json.loads(path.read_text())
    else:
        raise ValueError(f"{path}: a workload file is .json or .toml")
    if not isinstance(data, dict) or set(data) != {"classes"} or not isinstance(data["classes"], list):
        raise ValueError(f"{path}: expected exactly one top-level key, 'classes', a list of tables")
    return Workload(tuple(class_from_dict(c, where=f"{path} classes[{i}]") for i, c in enumerate(data["classes"])))

