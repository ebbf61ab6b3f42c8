"""k requests with k different LoRAs, one denoising step each at CFG: grouped by adapter set (today)
vs one mixed batch with runtime LoRA branches (lora/multi_lora.py, issue 5's stretch goal).

    python benchmarks/multi_lora_batch.py [--models default,sd15] [--ks 2,4,8] [--repeats N] [--device cpu|cuda]

Rows, per model and k (each request has its own adapter; the UNet batch is 2 per request):
- grouped by adapter set (what the scheduler does now: the batch key includes the set): for each
  request, `EngineAdapters.apply([(adapter_i, 1.0)])` on the torch engine with that set's merged
  weights in the DeltaCache (every set used twice first, so it is kept: one `copy_` per target
  weight), then `engine.run` at batch 2. Total of the k requests; the refit share is its own column;
- one mixed batch: the base weights, `MultiLora` branches of all k adapters installed, per-sample
  indices set, one `engine.run` at batch 2k;
- floor: the base UNet at batch 2k, no LoRA at all (what a free, perfect mixed batch would cost).
Throughput is request-steps per second (k / time); "mixed / grouped" is the throughput ratio
(> 1: the mixed batch wins). Rounds interleave the three (median of --repeats rounds after one
warm-up), so a shared CPU's drift hits them alike.

Models and adapters (random values, seeded: values do not change the cost):
- the embedded default model (`impasto.models.default_model_path()`), rank 4 on attention,
  proj_in/out, feed-forward and the resnets' 3x3 convs (lora_switch.py's TINY_TARGETS);
- a real-size SD 1.5 UNet (its public config, random weights, as lora_switch.py builds it) at
  256x256 (latent 32x32; 64x64 with --device cuda), rank 16 on to_q/to_k/to_v/to_out.0.

Result (AMD EPYC, 2 cores shared, torch 2.13 CPU fp32, 1 thread, load average 1.7 before / 2.1 after;
`OMP_NUM_THREADS=1 flock /tmp/impasto-bench.lock python benchmarks/multi_lora_batch.py`, commit e1a16ff + these files):

    model                      k  grouped ms  refit ms  mixed ms  floor ms  mixed / grouped
    default, 16x16, rank 4     2       28.9       1.4      30.5      21.9   0.95
    default, 16x16, rank 4     4       54.7       2.5      53.5      41.8   1.02
    default, 16x16, rank 4     8      115.2       5.3      96.3      71.4   1.20
    SD 1.5, 32x32, rank 16     2     7369.0      55.5    6388.8    6296.3   1.15
    SD 1.5, 32x32, rank 16     4    15032.8      99.6   12622.3   12209.0   1.19
    SD 1.5, 32x32, rank 16     8    24615.8     192.2   23203.2   22737.7   1.06

The mixed batch wins on the real-size UNet (6-19%) and from k=4 on the default model; it loses 5%
at k=2 on the default model, whose many small layers make the branches cost 25-40% over the floor
(on SD 1.5: 1.5-3.5%). The gain is batching's, not the refit's (under 1% of a SD 1.5 step). SD 1.5
rows are medians of 2 rounds on a loaded CPU (±10%). No GPU was measured.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

warnings.filterwarnings("ignore")
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_common import print_header, print_table  # noqa: E402

TINY_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1", "conv2"]
SD15_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


def random_adapter(unet, targets, rank: int, seed: int):
    """A CanonicalAdapter on every Linear / Conv2d whose name ends in one of `targets`."""
    from impasto.lora import CanonicalAdapter, LoraModule

    g = torch.Generator().manual_seed(seed)
    modules = {}
    for name, module in unet.named_modules():
        if not isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)) or not any(name.endswith(t) for t in targets):
            continue
        w = module.weight
        down = torch.randn(rank, *w.shape[1:], generator=g) / w[0].numel() ** 0.5
        up = torch.randn(w.shape[0], rank, *([1, 1] if w.ndim == 4 else []), generator=g) * 0.1
        modules[f"unet.{name}"] = LoraModule(down=down, up=up, alpha=float(rank))
    return CanonicalAdapter(modules=modules)


def unet_inputs(unet, batch: int, hw: int):
    return {
        "sample": torch.randn(batch, unet.config.in_channels, hw, hw),
        "timestep": torch.full((batch,), 500.0),
        "encoder_hidden_states": torch.randn(batch, 77, unet.config.cross_attention_dim),
    }


def bench_model(label: str, unet, hw: int, targets, rank: int, ks: list[int], repeats: int, device: str) -> list[list[object]]:
    from impasto.backends.torch_backend import TorchUNet
    from impasto.core.adapter_weights import EngineAdapters
    from impasto.lora import DeltaCache
    from impasto.lora.multi_lora import MultiLora

    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    engine = TorchUNet(unet, device=device)
    adapters = [random_adapter(unet, targets, rank, seed) for seed in range(1, max(ks) + 1)]
    state = EngineAdapters(engine, "unet", DeltaCache(1 << 40), "bench")
    for _ in range(2):  # a set is kept in the cache from its second use on (the doorkeeper)
        for adapter in adapters:
            state.apply([(adapter, 1.0)])
    state.apply([])
    rows = []
    for k in ks:
        pair, full = unet_inputs(unet, 2, hw), unet_inputs(unet, 2 * k, hw)

        def grouped() -> tuple[float, float]:
            refit_s = 0.0
            started = time.perf_counter()
            for adapter in adapters[:k]:
                refit_s += state.apply([(adapter, 1.0)])  # k >= 2: always a switch, never None
                engine.run(pair)
            sync()
            return time.perf_counter() - started, refit_s

        def mixed() -> float:
            multi = MultiLora(engine.module, adapters[:k])  # built outside the timing
            multi.set_requests(list(range(k)))
            sync()
            started = time.perf_counter()
            engine.run(full)
            sync()
            elapsed = time.perf_counter() - started
            multi.remove()
            return elapsed

        def floor() -> float:
            started = time.perf_counter()
            engine.run(full)
            sync()
            return time.perf_counter() - started

        times = {"grouped": [], "refit": [], "mixed": [], "floor": []}
        for round_ in range(repeats + 1):  # round 0 warms up
            g, r = grouped()
            state.apply([])  # the mixed batch and the floor run on the base weights
            m, f = mixed(), floor()
            if round_:
                for key, value in (("grouped", g), ("refit", r), ("mixed", m), ("floor", f)):
                    times[key].append(value)
        med = {key: statistics.median(v) for key, v in times.items()}
        print(f"  {label}, k={k}: grouped {med['grouped'] * 1e3:.1f} ms, mixed {med['mixed'] * 1e3:.1f} ms", file=sys.stderr, flush=True)
        rows.append([
            label, k, f"{med['grouped'] * 1e3:.1f}", f"{med['refit'] * 1e3:.1f}", f"{med['mixed'] * 1e3:.1f}", f"{med['floor'] * 1e3:.1f}",
            f"{k / med['grouped']:.2f}", f"{k / med['mixed']:.2f}", f"{k / med['floor']:.2f}", f"{med['grouped'] / med['mixed']:.2f}",
        ])
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="default,sd15")
    parser.add_argument("--ks", default="2,4,8")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--sd15-repeats", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    from diffusers import UNet2DConditionModel

    from impasto.models import default_model_path

    ks = [int(k) for k in args.ks.split(",")]
    models = args.models.split(",")
    print_header("Different LoRAs in one batch: runtime branches (mixed) vs refit per adapter set (grouped)")
    rows = []
    if "default" in models:
        unet = UNet2DConditionModel.from_pretrained(Path(default_model_path()) / "unet").eval()
        size = unet.config.sample_size
        rows += bench_model(f"default model, latent {size}x{size}, rank 4", unet, size, TINY_TARGETS, 4, ks, args.repeats, args.device)
        del unet
    if "sd15" in models:
        torch.manual_seed(0)
        unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768, attention_head_dim=8).eval()
        hw = 64 if args.device.startswith("cuda") else 32
        rows += bench_model(f"SD 1.5 UNet, latent {hw}x{hw}, rank 16 attn", unet, hw, SD15_TARGETS, 16, ks, args.sd15_repeats, args.device)
    print_table(
        ["model", "k", "grouped ms", "of which refit ms", "mixed ms", "floor ms",
         "grouped req-steps/s", "mixed req-steps/s", "floor req-steps/s", "mixed / grouped"],
        rows,
    )
    print("grouped: k x (refit from cached merged weights + UNet call of batch 2); mixed: one call of batch 2k with")
    print("runtime LoRA branches of all k adapters; floor: the base UNet at batch 2k, no LoRA. mixed / grouped: throughput ratio")
    print("(> 1: one mixed batch wins). Medians of rounds that interleave the three, in this process.")


if __name__ == "__main__":
    main()
