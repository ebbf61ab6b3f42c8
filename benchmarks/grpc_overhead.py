"""The cost of the gRPC layer: Generate's round trip against the same work called in-process.

One request at a time, default model and default settings. The in-process baseline calls the
core (`ImageEngine.generate`) in this process; the gRPC path calls a real `impasto serve` in a
subprocess through the real client over loopback TCP. Both consume the same events (one
progress event per step, no previews unless asked).

Runs come in pairs whose order flips every pair (ABBA), so drift in the machine's load and any
order effect hit both sides alike; the overhead is the median of the per-pair ratios. Wall
clock alone misleads on a shared machine, so CPU per request is printed beside it: this
process during in-process runs; the server process (from /proc) plus this process, the
client, during gRPC runs. "engine" is the server-side time from admission to the last event
(Done.elapsed_seconds); wall minus engine is what the path adds around the engine.

    .venv/bin/python benchmarks/grpc_overhead.py [--runs 40] [--steps N]
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import os
import re
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field

from bench_common import ROOT, print_header, print_table


@dataclass
class Side:
    wall: list[float] = field(default_factory=list)
    engine: list[float] = field(default_factory=list)  # Done.elapsed_seconds
    cpu: float = 0.0  # seconds, summed over the measured runs
    server_cpu: float = 0.0


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


def process_cpu_seconds(pid: int) -> float:
    """utime + stime of a whole process, all its threads (Linux /proc); 0.0 elsewhere."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=40, help="runs of each path (pairs of one each)")
    parser.add_argument("--warmup", type=int, default=3, help="unmeasured runs of each path first")
    parser.add_argument("--steps", type=int, default=None, help="default: the model's")
    parser.add_argument("--prompt", default="a red circle on a white background")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads on both sides (1: robust on a shared machine)")
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)

    from impasto.config import ServerConfig
    from impasto.core.image_engine import ImageEngine
    from impasto.core.spec import Done as CoreDone
    from impasto.core.spec import GenerationSpec
    from impasto_client import Done, ImpastoClient

    engine = ImageEngine(ServerConfig())
    engine.start()
    proc, target = start_server(args.threads)
    client = ImpastoClient(target)
    local, remote = Side(), Side()
    messages: collections.Counter[str] = collections.Counter()

    async def consume_in_process(seed: int) -> float:
        elapsed = float("nan")
        async for event in engine.generate(GenerationSpec(prompt=args.prompt, seed=seed, num_steps=args.steps)):
            if isinstance(event, CoreDone):
                elapsed = event.elapsed_seconds
        return elapsed

    loop = asyncio.new_event_loop()

    def in_process(seed: int, side: Side | None) -> None:
        cpu, t = time.process_time(), time.perf_counter()
        elapsed = loop.run_until_complete(consume_in_process(seed))
        if side is not None:
            side.wall.append(time.perf_counter() - t)
            side.cpu += time.process_time() - cpu
            side.engine.append(elapsed)

    def over_grpc(seed: int, side: Side | None) -> None:
        server_cpu, cpu, t = process_cpu_seconds(proc.pid), time.process_time(), time.perf_counter()
        elapsed, kinds = float("nan"), collections.Counter()
        for event in client.generate(args.prompt, seed=seed, num_steps=args.steps):
            kinds[type(event).__name__] += 1
            if isinstance(event, Done):
                elapsed = event.elapsed_seconds
        if side is not None:
            side.wall.append(time.perf_counter() - t)
            side.cpu += time.process_time() - cpu
            side.server_cpu += process_cpu_seconds(proc.pid) - server_cpu
            side.engine.append(elapsed)
            messages.update(kinds)

    load_before = os.getloadavg()
    try:
        for seed in range(args.warmup):
            in_process(seed, None)
            over_grpc(seed, None)
        for seed in range(args.runs):
            # ABBA: local-remote, remote-local, ... so neither path always runs second.
            if seed % 2 == 0:
                in_process(seed, local)
                over_grpc(seed, remote)
            else:
                over_grpc(seed, remote)
                in_process(seed, local)
    finally:
        client.close()
        proc.terminate()
        proc.wait(10)
        engine.stop()
    load_after = os.getloadavg()

    defaults = engine.registry.resolve("").defaults
    steps = args.steps or defaults.num_steps
    print_header(
        f"gRPC Generate round trip vs in-process, default model, {steps} steps, {defaults.sampler}, {args.runs} runs each (ABBA), {args.threads} thread(s)"
    )
    print(f"load average (1 min): {load_before[0]:.2f} before, {load_after[0]:.2f} after, on {os.cpu_count()} cores")
    n = args.runs
    per_request = {kind: count / n for kind, count in messages.items()}
    print(f"messages per gRPC request: {sum(per_request.values()):g} ({', '.join(f'{k} {v:g}' for k, v in per_request.items())})")
    print()

    def row(name: str, side: Side, cpu_ms: float, ratio: str) -> list[str]:
        med, eng = statistics.median(side.wall), statistics.median(side.engine)
        return [name, f"{med * 1e3:.1f}", f"{_q(side.wall, 0.1) * 1e3:.1f}", f"{_q(side.wall, 0.9) * 1e3:.1f}", f"{eng * 1e3:.1f}", f"{(med - eng) * 1e3:.2f}", f"{cpu_ms:.1f}", ratio]

    local_cpu_ms = local.cpu / n * 1e3
    remote_cpu_ms = (remote.cpu + remote.server_cpu) / n * 1e3
    ratios = sorted(r / b for r, b in zip(remote.wall, local.wall))
    print_table(
        ["path", "median ms", "p10 ms", "p90 ms", "engine ms", "wall-engine ms", "CPU ms/req", "paired ratio"],
        [
            row("in-process (baseline)", local, local_cpu_ms, "1.000"),
            row("gRPC over loopback", remote, remote_cpu_ms, f"{statistics.median(ratios):.3f}"),
        ],
    )
    print(
        f"gRPC CPU per request: server process {remote.server_cpu / n * 1e3:.1f} ms + client {remote.cpu / n * 1e3:.1f} ms "
        f"vs in-process {local_cpu_ms:.1f} ms: {(remote_cpu_ms / local_cpu_ms - 1) * 100:+.1f}%"
    )
    print(
        f"gRPC overhead: {(statistics.median(ratios) - 1) * 100:+.1f}% (median of paired wall ratios; "
        f"interquartile {(_q(ratios, 0.25) - 1) * 100:+.1f}% to {(_q(ratios, 0.75) - 1) * 100:+.1f}%) (goal <= 3%)"
    )


def _q(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


if __name__ == "__main__":
    main()
