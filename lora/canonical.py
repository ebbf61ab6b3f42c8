"""The canonical adapter: the one form every LoRA file format is parsed into.

A target is `<component>.<module path>` in diffusers' naming, e.g.
`unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q` or
`text_encoder.text_model.encoder.layers.0.self_attn.q_proj`.

Text-encoder targets always carry `text_model.` (the CLIP layout that every LoRA file in the wild
and every SD checkpoint folder before transformers 5 uses). transformers 5 flattens
`CLIPTextModel` (no `text_model.`) but not `CLIPTextModelWithProjection`, so the spelling of
the loaded module depends on the class and the library version; matching against a base model
(`match.py`) bridges that, and the canonical name does not move with it.

Each target holds `down` (r×in, or r×in×k×k for a conv), `up` (out×r, or out×r×1×1) and
`alpha`; the delta is `alpha / rank · up @ down`. Every source scale (kohya alpha/rank, PEFT
lora_alpha/r and rsLoRA lora_alpha/√r, cloneofsimo's pre-scaled up) is expressed through
`alpha`, so there is exactly one rule for the scale.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass, field
from functools import cached_property

import torch

COMPONENTS = ("unet", "text_encoder", "text_encoder_2")
TEXT_ENCODERS = ("text_encoder", "text_encoder_2")

# Bumped whenever the byte layout hashed by `content_hash` changes.
_HASH_SCHEME = b"impasto-lora-canonical-v1"


def split_target(target: str) -> tuple[str, str]:
    """`unet.down_blocks.0…` -> (`unet`, `down_blocks.0…`)."""
    component, _, path = target.partition(".")
    if component not in COMPONENTS or not path:
        raise ValueError(f"target {target!r} does not start with one of {COMPONENTS}")
    return component, path


def canonical_target(component: str, module_path: str) -> str:
    """The canonical target for a module path as a file spells it (see the module docstring)."""
    if component not in COMPONENTS:
        raise ValueError(f"unknown component {component!r}; expected one of {COMPONENTS}")
    if component in TEXT_ENCODERS and not module_path.startswith(("text_model.", "text_projection")):
        module_path = "text_model." + module_path
    return f"{component}.{module_path}"


@dataclass(frozen=True)
class LoraModule:
    """One target's low-rank pair. `alpha / rank` is the scale, whatever the source format."""

    down: torch.Tensor
    up: torch.Tensor
    alpha: float

    def __post_init__(self):
        d, u = self.down, self.up
        if d.ndim not in (2, 4) or u.ndim != d.ndim:
            raise ValueError(f"down {tuple(d.shape)} and up {tuple(u.shape)} must both be 2-D or both 4-D")
        if u.shape[1] != d.shape[0]:
            raise ValueError(f"rank differs: down {tuple(d.shape)} vs up {tuple(u.shape)}")
        if d.ndim == 4 and tuple(u.shape[2:]) != (1, 1):
            raise ValueError(f"conv up must be 1x1, got {tuple(u.shape)}")

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    @property
    def is_conv(self) -> bool:
        return self.down.ndim == 4

    @property
    def delta_shape(self) -> tuple[int, ...]:
        """The shape of the weight this pair changes: (out, in) or (out, in, kh, kw)."""
        return (int(self.up.shape[0]),) + tuple(int(s) for s in self.down.shape[1:])

    def delta(self, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> torch.Tensor:
        """scale · up @ down, computed in fp32 (fp16 matmuls lose the small deltas), cast last."""
        up = self.up.to(device=device, dtype=torch.float32).flatten(1)
        down = self.down.to(device=device, dtype=torch.float32).flatten(1)
        return (self.scale * (up @ down)).reshape(self.delta_shape).to(dtype)

    @property
    def nbytes(self) -> int:
        return self.down.numel() * self.down.element_size() + self.up.numel() * self.up.element_size()


@dataclass
class CanonicalAdapter:
    """An adapter in canonical form. See the module docstring for the naming and scale rules.

    `embeddings` maps a textual-inversion token to its vectors per text encoder
    (`{"<s1>": {"text_encoder": tensor[num_vectors, dim]}}`).
    `metadata` is the source file's own metadata (kohya `ss_*`, diffusers' config, ...), kept
    for inspection; it is not part of the content hash.
    `warnings` are things the parser accepted but that a caller should report (never silent).
    `file_sha256` is A1111's hash of the source safetensors file where there was one
    (`hashing.addnet_hash`).
    """

    modules: dict[str, LoraModule]
    embeddings: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    metadata: dict[str, str] = field(default_factory=dict)
    source_format: str = "canonical"
    warnings: list[str] = field(default_factory=list)
    file_sha256: str | None = None

    def __post_init__(self):
        for target in self.modules:
            split_target(target)
        for token, per_component in self.embeddings.items():
            for component in per_component:
                if component not in TEXT_ENCODERS:
                    raise ValueError(f"embedding {token!r} is for {component!r}, not a text encoder")

    @property
    def components(self) -> list[str]:
        found = {split_target(t)[0] for t in self.modules}
        found |= {c for per in self.embeddings.values() for c in per}
        return [c for c in COMPONENTS if c in found]

    def modules_of(self, component: str) -> dict[str, LoraModule]:
        """{module path: pair} for one component, the path without the component prefix."""
        return {split_target(t)[1]: m for t, m in self.modules.items() if split_target(t)[0] == component}

    @property
    def ranks(self) -> dict[int, int]:
        """{rank: number of targets with that rank}."""
        out: dict[int, int] = {}
        for m in self.modules.values():
            out[m.rank] = out.get(m.rank, 0) + 1
        return dict(sorted(out.items()))

    @property
    def num_parameters(self) -> int:
        n = sum(m.down.numel() + m.up.numel() for m in self.modules.values())
        return n + sum(t.numel() for per in self.embeddings.values() for t in per.values())

    @property
    def nbytes(self) -> int:
        n = sum(m.nbytes for m in self.modules.values())
        return n + sum(t.numel() * t.element_size() for per in self.embeddings.values() for t in per.values())

    @cached_property
    def content_hash(self) -> str:
        """sha256 over the canonical serialisation: what the adapter does, not how a file spells it.

        Covered: every target name, its alpha (as float64), the dtype, shape and raw bytes of down
        and up; every embedding token, component, dtype, shape and bytes. Sorted, length-prefixed.
        Not covered: metadata, source format, warnings. So one adapter saved as kohya, diffusers
        and PEFT hashes the same, and the same file re-saved with other metadata does too.
        The adapter is treated as immutable once hashed.
        """
        h = hashlib.sha256(_HASH_SCHEME)
        for target in sorted(self.modules):
            m = self.modules[target]
            _put_str(h, "module")
            _put_str(h, target)
            h.update(struct.pack("<d", float(m.alpha)))
            _put_tensor(h, m.down)
            _put_tensor(h, m.up)
        for token in sorted(self.embeddings):
            for component in sorted(self.embeddings[token]):
                _put_str(h, "embedding")
                _put_str(h, token)
                _put_str(h, component)
                _put_tensor(h, self.embeddings[token][component])
        return h.hexdigest()


def _put_str(h, s: str) -> None:
    b = s.encode("utf-8")
    h.update(struct.pack("<Q", len(b)))
    h.update(b)


def _put_tensor(h, t: torch.Tensor) -> None:
    t = t.detach().to("cpu").contiguous()
    _put_str(h, str(t.dtype))
    h.update(struct.pack("<Q", t.ndim))
    h.update(struct.pack(f"<{t.ndim}Q", *t.shape))
    # Raw bytes through a uint8 view: works for bf16 too, which numpy cannot represent.
    h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
