"""The `impasto` command: serve, generate, models (and the compiler's and LoRA toolbox's commands)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from pathlib import Path


def _serve(args) -> int:
    from impasto.config import load_config
    from impasto.rpc.app import ImpastoServer

    config = load_config(
        args.config,
        host=args.host,
        port=args.port,
        models_dir=args.models_dir,
        default_model=args.default_model,
        max_batch_size=args.max_batch_size,
        metrics_port=args.metrics_port,
        backends=tuple(args.backend.split(",")) if args.backend else None,
        engines_dir=args.engines_dir,
        admission_wait_ms=args.admission_wait_ms,
        max_running_images=args.max_running_images,
        fast_lane_max_steps=args.fast_lane_max_steps,
        fast_lane_max_stretch=args.fast_lane_max_stretch,
        intra_op_threads=args.threads,
        adapters_dir=args.adapters_dir,
        apply_embeddings_named_in_prompt=args.apply_embeddings_named_in_prompt,
    )

    async def run() -> None:
        server = ImpastoServer(config)
        await server.start()
        import torch

        print(f"impasto: {torch.get_num_threads()} torch threads", flush=True)
        print(f"impasto: serving on {config.host}:{server.port}", flush=True)
        if server.metrics_port is not None:
            print(f"impasto: metrics on http://{config.host}:{server.metrics_port}/metrics", flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        await server.stop()

    asyncio.run(run())
    return 0


def _client(args):
    try:
        from impasto_client import ImpastoClient
    except ImportError:
        sys.exit("impasto: the client package is not installed (pip install -e clients/python)")
    return ImpastoClient(args.target)


def _generate(args) -> int:
    from impasto_client import Done, Image, ImpastoError, Progress, Queued, Started

    from .atomic_files import write_file
    from .cli_output import ProgressPrinter

    width, height = 0, 0
    if args.size:
        try:
            width, height = (int(v) for v in args.size.lower().split("x"))
        except ValueError:
            sys.exit(f"impasto: --size must look like 512x512, got {args.size!r}")
    out = Path(args.output)
    fmt = args.format or {".jpg": "jpeg", ".jpeg": "jpeg", ".webp": "webp"}.get(out.suffix.lower(), "png")
    client = _client(args)
    progress = ProgressPrinter(sys.stderr)
    try:
        for event in client.generate(
            args.prompt,
            negative_prompt=args.negative_prompt,
            model=args.model,
            width=width,
            height=height,
            num_steps=args.steps,
            guidance_scale=args.cfg,
            sampler=args.sampler,
            seed=args.seed,
            num_images=args.num_images,
            image_format=fmt,
            preview_every=args.preview_every,
            timeout=args.timeout,
        ):
            if isinstance(event, Queued):
                progress.message(f"queued at position {event.position}")
            elif isinstance(event, Started):
                progress.message(f"started: {event.model}, {event.sampler}, {event.width}x{event.height}, seed {event.seed}")
            elif isinstance(event, Progress):
                progress.update(event.step, event.num_steps, f"eta {event.eta_seconds:5.1f}s")
                if event.preview and args.preview_dir:
                    write_file(Path(args.preview_dir) / f"preview_{event.step:04d}.jpg", event.preview)
            elif isinstance(event, Image):
                path = out if args.num_images == 1 else out.with_name(f"{out.stem}-{event.index}{out.suffix}")
                progress.message(f"wrote {write_file(path, event.data)} (seed {event.seed})")
            elif isinstance(event, Done):
                progress.message(f"done in {event.elapsed_seconds:.2f}s")
    except ImpastoError as error:
        progress.message(f"impasto: {error}")
        return 2
    finally:
        client.close()
    return 0


def _models(args) -> int:
    from impasto_client import ImpastoError

    client = _client(args)
    try:
        for m in client.list_models():
            state = "" if m.available else f"  (unavailable: {m.unavailable_reason})"
            default = " [default]" if m.is_default else ""
            print(f"{m.name}{default}  hash {m.hash or '-'}  {m.default_width}x{m.default_height}{state}")
    except ImpastoError as error:
        print(f"impasto: {error}", file=sys.stderr)
        return 2
    finally:
        client.close()
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="impasto", description="Serve and train Stable-Diffusion-family models over gRPC.")
    parser.add_argument("--log-level", default="INFO")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the gRPC server")
    serve.add_argument("--config", type=Path, help="a TOML config file (see impasto/config.py)")
    serve.add_argument("--host")
    serve.add_argument("--port", type=int)
    serve.add_argument("--models-dir", type=Path, help="a folder of diffusers-format model folders")
    serve.add_argument("--default-model", help="the model used when a request names none")
    serve.add_argument("--adapters-dir", type=Path, help="where uploaded LoRA adapters are stored (default: <data dir>/adapters)")
    serve.add_argument(
        "--apply-embeddings-named-in-prompt",
        action=argparse.BooleanOptionalAction,
        help="an uploaded embedding applies wherever a prompt writes its token, as in A1111 (default: on)",
    )
    serve.add_argument("--max-batch-size", type=int, help="images per UNet call; 1 turns batching off")
    serve.add_argument("--max-running-images", type=int, help="images admitted at once (default 4 batches)")
    serve.add_argument("--fast-lane-max-steps", type=int, help="requests of at most this many steps get a fast lane (default 8; 0: off)")
    serve.add_argument("--fast-lane-max-stretch", type=float, help="long requests join a short one's batch while its step takes at most this many times as long (default 1.5)")
    serve.add_argument("--threads", type=int, help="torch intra-op threads (default: one per core)")
    serve.add_argument("--admission-wait-ms", type=float, help="wait this long for more requests before a batch starts from idle")
    serve.add_argument("--backend", help="backend preference order, e.g. openvino,onnxruntime,torch (torch is the fallback)")
    serve.add_argument("--engines-dir", type=Path, help="engine folders written by `impasto compile --out`")
    serve.add_argument("--metrics-port", type=int, help="serve Prometheus metrics on this port (0: a free one)")
    serve.set_defaults(func=_serve)

    target = argparse.ArgumentParser(add_help=False)
    target.add_argument("--target", default="localhost:50051", help="server address (default localhost:50051)")

    gen = sub.add_parser("generate", parents=[target], help="generate an image through a running server")
    gen.add_argument("prompt")
    gen.add_argument("-o", "--output", default="out.png")
    gen.add_argument("-n", "--negative-prompt", default="")
    gen.add_argument("--model", default="")
    gen.add_argument("--size", help="WIDTHxHEIGHT (default: the model's)")
    gen.add_argument("--steps", type=int)
    gen.add_argument("--cfg", type=float, help="guidance scale")
    gen.add_argument("--sampler", default="")
    gen.add_argument("--seed", type=int)
    gen.add_argument("--num-images", type=int, default=1)
    gen.add_argument("--format", choices=["png", "jpeg", "webp"])
    gen.add_argument("--preview-every", type=int, default=0)
    gen.add_argument("--preview-dir", help="save previews here")
    gen.add_argument("--timeout", type=float, help="seconds; the server stops the work when it passes")
    gen.set_defaults(func=_generate)

    models = sub.add_parser("models", parents=[target], help="list the models of a running server")
    models.set_defaults(func=_models)

    # Commands owned by other parts register themselves when those parts are present.
    for module, hook in (("impasto.compiler.cli", "add_compile_command"), ("impasto.lora.cli", "add_lora_commands"), ("impasto.training.cli", "add_train_command"), ("impasto_client.bench.cli", "add_bench_command")):
        try:
            getattr(__import__(module, fromlist=[hook]), hook)(sub)
        except (ImportError, AttributeError):
            pass
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return args.func(args) or 0


if __name__ == "__main__":
    sys.exit(main())
