"""The cost of the gRPC layer: Generate's round trip against the same work called in-process.

One run, default model and default settings. The in-process baseline calls the core
(`ImageEngine.generate`) in this process; the gRPC path calls a real `impasto serve` in a
subprocess through the real client over loopback TCP. Runs alternate so that load from other
processes on the machine hits both sides alike; medians are reported.

    .venv/bin/python benchmarks/grpc_overhead.py [--runs 20] [--steps N]
"""

from __future__ import annotations

import argparse
import asyncio
import re
import statistics
import subprocess
import sys
import time

from bench_common import ROOT, print_header, print_table


def start_server(threads: int) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "impasto.cli", "--log-level", "WARNING", "serve", "--port", "0", "--threads", str(threads)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    for line in proc.stdout:
        match = re.match(r"impasto: serving on (\S+)", line)
        if match:
            return proc, match.group(1)
    raise RuntimeError("server did not start")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--steps", type=int, default=None, help="default: the model's")
    parser.add_argument("--prompt", default="a red circle on a white background")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads on both sides (1: robust on a shared machine)")
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)

    from impasto.config import ServerConfig
    from impasto.core.image_engine import ImageEngine
    from impasto.core.spec import GenerationSpec
    from impasto_client import ImpastoClient

    engine = ImageEngine(ServerConfig())
    engine.start()
    proc, target = start_server(args.threads)
    client = ImpastoClient(target)

    async def in_process(seed: int) -> None:
        async for _ in engine.generate(GenerationSpec(prompt=args.prompt, seed=seed, num_steps=args.steps)):
            pass

    def over_grpc(seed: int) -> None:
        for _ in client.generate(args.prompt, seed=seed, num_steps=args.steps):
            pass

    loop = asyncio.new_event_loop()
    for seed in range(2):  # warm-up both paths
        loop.run_until_complete(in_process(seed))
        over_grpc(seed)
    local, remote = [], []
    try:
        for seed in range(args.runs):
            t = time.perf_counter()
            loop.run_until_complete(in_process(seed))
            local.append(time.perf_counter() - t)
            t = time.perf_counter()
            over_grpc(seed)
            remote.append(time.perf_counter() - t)
    finally:
        client.close()
        proc.terminate()
        proc.wait(10)
        engine.stop()

    defaults = engine.registry.resolve("").defaults
    steps = args.steps or defaults.num_steps
    print_header(
        f"gRPC Generate round trip vs in-process, default model, {steps} steps, {defaults.sampler}, {args.runs} runs, {args.threads} thread(s)"
    )
    med_local, med_remote = statistics.median(local), statistics.median(remote)
    print_table(
        ["path", "median ms", "p10 ms", "p90 ms", "ratio"],
        [
            ["in-process (baseline)", f"{med_local * 1e3:.1f}", f"{_q(local, 0.1) * 1e3:.1f}", f"{_q(local, 0.9) * 1e3:.1f}", "1.000"],
            ["gRPC over loopback", f"{med_remote * 1e3:.1f}", f"{_q(remote, 0.1) * 1e3:.1f}", f"{_q(remote, 0.9) * 1e3:.1f}", f"{med_remote / med_local:.3f}"],
        ],
    )
    print(f"gRPC overhead: {(med_remote / med_local - 1) * 100:+.1f}% (goal <= 3%)")


def _q(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


if __name__ == "__main__":
    main()
