"""Runtime LoRA branches with a per-sample adapter index: requests with different adapters in one UNet call.

What it computes, per wrapped layer and per sample i of the batch:
    y_i = base(x_i) + up[idx_i] @ (down[idx_i] @ x_i)
with `down` stacked as (slots, r_max, in) and `up` as (slots, out, r_max): every adapter's pair
zero-padded to the layer's largest rank (zero rows/columns add nothing) and its scale
(alpha / rank × the adapter's weight) folded into `up`. Slot 0 is all zeros and stands for "no
adapter" (index -1), as does an adapter that does not target that layer. The gather + two
`bmm` per layer are Punica's BGMV / S-LoRA's batched LoRA, written in plain torch.

Linear layers take (batch, in) or (batch, tokens, in); Conv2d layers take any kernel: `down`
runs as one grouped conv over the batch (group i = sample i's kernel, the base conv's stride,
padding and dilation), `up` as a per-sample 1×1 (an einsum).

The branches are forward hooks on the base modules, not replacement modules: parameter names do
not change, so an engine's refit / restore / named_weights by torch name keep working beside them.
The hook adds into the layer's fresh output in place (inference only: not for autograd).

CFG: the UNet batch is [uncond..., cond...], so `MultiLora.set_requests` repeats the per-request
indices (`cfg_indices`).

Not bit-exact against merged weights: merged computes (W + ΔW)·x, the branch W·x + B·(A·x); the
sums round differently (~1e-6 relative in fp32; tests/unit/test_multi_lora.py checks atol 1e-5).

Does it win? Yes, modestly, on a CPU (benchmarks/multi_lora_batch.py: 2-core shared AMD EPYC,
torch fp32, 1 thread, load average 1.7-2.1; k requests, each its own adapter, one step at CFG).
Throughput of one mixed call of batch 2k over k × (cached refit + call of batch 2):
    SD 1.5 UNet (random weights), latent 32x32, rank 16 on attention: 1.15x (k=2), 1.19x (k=4), 1.06x (k=8)
    default model, latent 16x16, rank 4 on attention/ff/convs:          0.95x (k=2), 1.02x (k=4), 1.20x (k=8)
Where the win comes from: batching itself (a batch-2k call costs less than k batch-2 calls), not
the refit, which is small (SD 1.5: 55-190 ms of 7-25 s, under 1%; default: ~5%). The branches
cost 1.5-3.5% over the base UNet at batch 2k on SD 1.5 (attention only, rank 16) but 25-40% on the
default model (many small layers, 3x3 convs in grouped form), which eats the batching gain at k=2.
SD 1.5 figures are medians of 2 rounds on a loaded CPU: ±10% noise (k=8's smaller ratio is within it).
This is the worst case for grouping (no two requests share a set); requests that share a set
already batch today without the branch cost. Not measured: a GPU (none for this task), where a
batch-2 call is far from full, so batching may gain more, and fp16. Not integrated: the
scheduler's batch key is unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from .canonical import CanonicalAdapter, LoraModule
from .match import match_targets, named_weight_shapes_of

NO_ADAPTER = -1


def cfg_indices(per_request: Sequence[int]) -> list[int]:
    """Per-sample indices of a CFG batch [uncond..., cond...]: each request's index twice."""
    return [*per_request, *per_request]


class MultiLoraBranch:
    """One layer's stacked pairs, and the hook that adds the selected pair's output to the base's."""

    def __init__(self, module: torch.nn.Module, pairs: Sequence[tuple[LoraModule, float] | None], owner: "MultiLora"):
        if not isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
            raise TypeError(f"runtime LoRA branches wrap Linear and Conv2d only, not {type(module).__name__}")
        self.module = module
        self.owner = owner  # holds the per-sample index, shared by every branch of the UNet
        weight = module.weight
        r_max = max(m.rank for m, _ in (p for p in pairs if p is not None))
        out_features, in_per_sample = weight.shape[0], weight.shape[1:]  # (in,) or (in, kh, kw)
        # Slot 0: the zero adapter. Slots 1..n: the adapters, each padded to r_max with zeros.
        down = torch.zeros(len(pairs) + 1, r_max, *in_per_sample, dtype=weight.dtype, device=weight.device)
        up = torch.zeros(len(pairs) + 1, out_features, r_max, dtype=weight.dtype, device=weight.device)
        for slot, pair in enumerate(pairs, start=1):
            if pair is None:
                continue
            lora, coef = pair
            # A 1×1 conv pair on a Linear, or a linear pair on a 1×1 conv (match.shapes_compatible).
            d = lora.down.to(weight.device, torch.float32).reshape(lora.rank, *in_per_sample)
            down[slot, : lora.rank] = d.to(weight.dtype)
            up[slot, :, : lora.rank] = (lora.up.to(weight.device, torch.float32).flatten(1) * coef).to(weight.dtype)
        self.down, self.up = down, up
        self.handle = module.register_forward_hook(self)

    def __call__(self, module, args, output):
        slots = self.owner.slots
        if slots is None:
            return output
        x = args[0]
        if slots.shape[0] != x.shape[0]:
            raise ValueError(f"{slots.shape[0]} adapter indices for a batch of {x.shape[0]}")
        down, up = self.down[slots], self.up[slots]  # (b, r, in...), (b, out, r)
        if isinstance(module, torch.nn.Linear):
            tokens = x.reshape(x.shape[0], -1, x.shape[-1])  # (b, t, in): attention inputs have tokens
            low = torch.bmm(tokens, down.transpose(1, 2))  # (b, t, r)
            # Added into the layer's own fresh output (a view of it): no second full-size tensor.
            output.reshape(low.shape[0], low.shape[1], -1).baddbmm_(low, up.transpose(1, 2))
            return output
        b, r = down.shape[:2]
        # Grouped conv: group i sees sample i's channels and applies sample i's r kernels.
        low = F.conv2d(x.reshape(1, -1, *x.shape[2:]), down.reshape(b * r, *down.shape[2:]), None,
                       module.stride, module.padding, module.dilation, groups=b)
        low = low.reshape(b, r, *low.shape[2:])
        return output.add_(torch.einsum("bor,brhw->bohw", up, low))

    def remove(self) -> None:
        self.handle.remove()


class MultiLora:
    """Runtime branches of several adapters on one UNet, and the per-sample adapter index.

    `adapters[i]` is slot i (index i); `weights[i]` scales it (default 1). Targets are resolved
    as refit resolves them (`match_targets` on the UNet's weights; unmatched or mismatched raise).
    """

    def __init__(self, unet: torch.nn.Module, adapters: Sequence[CanonicalAdapter], weights: Sequence[float] | None = None, component: str = "unet"):
        weights = list(weights) if weights is not None else [1.0] * len(adapters)
        if len(weights) != len(adapters):
            raise ValueError(f"{len(weights)} weights for {len(adapters)} adapters")
        shapes = named_weight_shapes_of({component: unet})
        per_module: dict[str, list[tuple[LoraModule, float] | None]] = {}
        for i, (adapter, weight) in enumerate(zip(adapters, weights)):
            report = match_targets(adapter, shapes, raise_on_error=True)
            for target, name in report.resolved.items():
                module_name = name.removeprefix(f"{component}.").removesuffix(".weight")
                slots = per_module.setdefault(module_name, [None] * len(adapters))
                lora = adapter.modules[target]
                slots[i] = (lora, float(weight) * lora.scale)
        modules = dict(unet.named_modules())
        self.num_adapters = len(adapters)
        self.slots: torch.Tensor | None = None  # (batch,) slot per sample; None: branches off
        self.branches = [MultiLoraBranch(modules[name], pairs, self) for name, pairs in per_module.items()]
        self.device = next(unet.parameters()).device

    def set_samples(self, indices: Sequence[int]) -> None:
        """One index per sample of the next calls' batch; -1: no adapter."""
        bad = [i for i in indices if not NO_ADAPTER <= i < self.num_adapters]
        if bad:
            raise ValueError(f"adapter indices {bad} outside -1..{self.num_adapters - 1}")
        self.slots = torch.tensor(indices, dtype=torch.long, device=self.device) + 1

    def set_requests(self, per_request: Sequence[int]) -> None:
        """One index per request of a CFG batch [uncond..., cond...]."""
        self.set_samples(cfg_indices(per_request))

    def clear(self) -> None:
        self.slots = None

    def remove(self) -> None:
        for branch in self.branches:
            branch.remove()
        self.branches = []
        self.slots = None
