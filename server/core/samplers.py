"""User-facing sampler names (A1111 / SD.Next) mapped to diffusers noise-scheduler configs.

A noise scheduler is stateful (step index, solver history), so every request builds its own
instance from the model's scheduler config plus the overrides below. Never share one.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import diffusers

from .errors import InvalidArgument


@dataclass(frozen=True)
class SamplerDef:
    name: str  # what a request says
    display_name: str  # what A1111 shows and writes into infotext
    noise_scheduler: str  # diffusers class name
    overrides: dict[str, Any] = field(default_factory=dict)


# The names and their diffusers equivalents follow the table diffusers documents for A1111
# users ("Schedulers" overview) and A1111's own sampler list. DPM++ SDE Karras draws its noise
# from a Brownian tree seeded by `noise_sampler_seed`, which we set from the request's seed
# (diffusers would seed it randomly), so that its images are reproducible too.
SAMPLERS: dict[str, SamplerDef] = {
    s.name: s
    for s in [
        SamplerDef("euler", "Euler", "EulerDiscreteScheduler"),
        SamplerDef("euler_a", "Euler a", "EulerAncestralDiscreteScheduler"),
        SamplerDef("heun", "Heun", "HeunDiscreteScheduler"),
        SamplerDef("lms", "LMS", "LMSDiscreteScheduler"),
        SamplerDef("lms_karras", "LMS Karras", "LMSDiscreteScheduler", {"use_karras_sigmas": True}),
        SamplerDef("dpm2", "DPM2", "KDPM2DiscreteScheduler"),
        SamplerDef("dpm2_a", "DPM2 a", "KDPM2AncestralDiscreteScheduler"),
        SamplerDef("ddim", "DDIM", "DDIMScheduler"),
        SamplerDef("pndm", "PLMS", "PNDMScheduler", {"skip_prk_steps": True}),
        SamplerDef("dpmpp_2m", "DPM++ 2M", "DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}),
        SamplerDef(
            "dpmpp_2m_karras",
            "DPM++ 2M Karras",
            "DPMSolverMultistepScheduler",
            {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": True},
        ),
        SamplerDef(
            "dpmpp_2m_sde_karras",
            "DPM++ 2M SDE Karras",
            "DPMSolverMultistepScheduler",
            {"algorithm_type": "sde-dpmsolver++", "solver_order": 2, "use_karras_sigmas": True},
        ),
        SamplerDef("dpmpp_sde_karras", "DPM++ SDE Karras", "DPMSolverSDEScheduler", {"use_karras_sigmas": True}),
        SamplerDef("unipc", "UniPC", "UniPCMultistepScheduler"),
        SamplerDef("lcm", "LCM", "LCMScheduler"),
    ]
}


def get_sampler(name: str) -> SamplerDef:
    try:
        return SAMPLERS[name]
    except KeyError:
        raise InvalidArgument("sampler", f"unknown sampler '{name}'; known: {', '.join(SAMPLERS)}") from None


def make_noise_scheduler(sampler: SamplerDef, base_config: dict[str, Any], seed: int):
    """A fresh noise scheduler for one request: the model's config plus the sampler's overrides."""
    cls = getattr(diffusers, sampler.noise_scheduler)
    overrides = dict(sampler.overrides)
    if sampler.noise_scheduler == "DPMSolverSDEScheduler":
        overrides["noise_sampler_seed"] = seed
    return cls.from_config(base_config, **overrides)
