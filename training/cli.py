"""`impasto train`, `impasto jobs` and `impasto prep`.

    impasto prep photos/ --out $IMPASTO_DATA_DIR/datasets/stars --size 64 --caption template --template "a {token} shape"
    impasto train dreambooth_lora --upload photos/ --dataset stars --adapter-name sks-star \\
        --instance-prompt "a sks shape" --class-prompt "a shape" --steps 300
    impasto jobs                      # list;  impasto jobs --watch ID  /  --cancel ID

`train` and `jobs` talk to a running server (the client package only); `prep` works locally.
"""

from __future__ import annotations

import sys
from pathlib import Path


def _client(args):
    try:
        from impasto_client import ImpastoClient
    except ImportError:
        sys.exit("impasto: the client package is not installed (pip install -e clients/python)")
    return ImpastoClient(args.target)


def _watch(client, job_id: str, args) -> int:
    from impasto_client.training import JobResumed, JobStatus, TrainingProgress, TrainingSample

    from impasto.atomic_files import write_file
    from impasto.cli_output import ProgressPrinter, file_slug

    progress = ProgressPrinter(sys.stderr)
    last = None
    for event in client.watch_job(job_id):
        if isinstance(event, TrainingProgress):
            progress.update(event.step, event.num_steps, f"loss {event.loss:.4f} lr {event.learning_rate:.1e} {event.phase} eta {event.eta_seconds:5.0f}s")
        elif isinstance(event, JobResumed):
            progress.message(f"resumed from the checkpoint at step {event.from_step}")
            progress.restart()
        elif isinstance(event, TrainingSample):
            if args.samples_dir:
                # Named by step and prompt, so a rerun writes the same names and two prompts never share one.
                path = write_file(Path(args.samples_dir) / f"step{event.step:05d}-{file_slug(event.prompt)}.png", event.image)
                progress.message(f"sample: {path} ({event.prompt})")
        elif isinstance(event, JobStatus):
            if last is None or event.state != last.state:
                progress.message(f"job {event.job_id}: {event.state}{' - ' + event.message if event.message else ''}")
            last = event
    if last is None or last.state != "succeeded":
        return 2
    if last.adapter_id:
        print(f"adapter '{last.adapter_name}' registered (id {last.adapter_id}); use <lora:{last.adapter_name}:1> in a prompt")
    if args.download_dir:
        out = Path(args.download_dir)
        for output in last.outputs:
            name, data = client.download_job_output(job_id, output)
            print(f"wrote {write_file(out / Path(name).name, data)}")
    return 0


def _prompts(repeated: list[str] | None, file: str | None) -> list[str]:
    """Prompts given one by one (a repeated option) and from a file, one per line ('#' comments)."""
    prompts = list(repeated or [])
    if file:
        lines = Path(file).read_text(encoding="utf-8").splitlines()
        prompts += [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    return prompts


def _train(args) -> int:
    from impasto_client import ImpastoError

    client = _client(args)
    try:
        if args.upload:
            response = client.upload_dataset(args.dataset, args.upload)
            print(f"uploaded dataset '{response.name}': {response.num_files} files, {response.size_bytes} bytes", file=sys.stderr)
        job_id = client.start_training(
            args.method,
            dataset=args.dataset,
            adapter_name=args.adapter_name,
            model=args.model,
            instance_prompt=args.instance_prompt,
            num_steps=args.steps,
            batch_size=args.batch_size,
            seed=args.seed,
            checkpoint_every=args.checkpoint_every,
            sample_every=args.sample_every,
            sample_prompts=args.sample_prompt,
            masked_loss=args.masked_loss,
            gradient_checkpointing=args.gradient_checkpointing,
            lr_scheduler=args.lr_scheduler,
            rank=args.rank,
            alpha=args.alpha,
            train_text_encoder=args.train_text_encoder,
            conv=args.conv,
            unet_lr=args.unet_lr,
            text_encoder_lr=args.text_encoder_lr,
            class_prompt=args.class_prompt,
            extra_class_prompts=_prompts(args.extra_class_prompt, args.class_prompt_file),
            num_class_images=args.num_class_images,
            prior_loss_weight=args.prior_loss_weight,
            prior_target=args.prior_target,
            token_contrast_weight=args.token_contrast_weight,
            token=args.token,
            initializer_token=args.initializer_token,
            num_vectors=args.num_vectors,
            embedding_lr=args.embedding_lr,
            embedding_steps=args.embedding_steps,
            train_lora_with_embedding=args.train_lora_with_embedding,
            text_encoder_only=args.text_encoder_only,
            text_prior_prompts=_prompts(args.text_prior_prompt, args.text_prior_file),
            text_prior_weight=args.text_prior_weight,
        )
        print(f"job {job_id} queued", file=sys.stderr)
        if args.detach:
            print(job_id)
            return 0
        return _watch(client, job_id, args)
    except ImpastoError as error:
        print(f"\nimpasto: {error}", file=sys.stderr)
        return 2
    finally:
        client.close()


def _jobs(args) -> int:
    from impasto_client import ImpastoError

    client = _client(args)
    try:
        if args.cancel:
            job = client.cancel_job(args.cancel)
            print(f"job {job.job_id}: {job.state}")
            return 0
        if args.watch:
            return _watch(client, args.watch, args)
        for job in client.list_jobs():
            extra = f" resumed@{job.resumed_from_step}" if job.resumed_from_step else ""
            print(f"{job.job_id}  {job.state:10s} {job.step}/{job.num_steps}  loss {job.loss:.4f}  -> {job.adapter_name}{extra}  {job.message}")
        return 0
    except ImpastoError as error:
        print(f"impasto: {error}", file=sys.stderr)
        return 2
    finally:
        client.close()


def _prep(args) -> int:
    from .prep import PrepConfig, prepare

    cfg = PrepConfig(
        source=args.source, out=args.out, size=args.size, crop=args.crop, caption=args.caption, template=args.template,
        token=args.token, masks=args.masks or "", min_size=args.min_size, seed=args.seed, overwrite=args.overwrite,
    )  # fmt: skip
    try:
        report = prepare(cfg)
    except (ValueError, FileNotFoundError, FileExistsError) as exc:
        print(f"impasto prep: {exc}", file=sys.stderr)
        return 2
    print(report.summary())
    print(f"wrote {args.out}")
    return 0 if report.kept else 2


def _watch_options(parser) -> None:
    parser.add_argument("--samples-dir", help="save the sample images the job sends here")
    parser.add_argument("--download-dir", help="when the job succeeds, download its adapter files here")


def add_train_command(subparsers) -> None:
    target = {"default": "localhost:50051", "help": "server address (default localhost:50051)"}
    train = subparsers.add_parser(
        "train", help="train an adapter on a running server, with a progress bar",
        description="Train an adapter on a running server and watch it. A numeric option left out or 0, and a "
        "flag left off, takes the server's default for the method (for example 300 steps; 500 for textual inversion, 400 for pivotal tuning).",
    )  # fmt: skip
    train.add_argument("method", choices=["lora", "dreambooth_lora", "textual_inversion", "pivotal_tuning"])
    train.add_argument("--target", **target)
    train.add_argument("--dataset", required=True, help="dataset folder name under the server's data dir (or the name to upload as)")
    train.add_argument("--upload", help="upload this local folder as --dataset first")
    train.add_argument("--adapter-name", required=True)
    train.add_argument("--model", default="")
    train.add_argument("--instance-prompt", default="", help="caption of images without one; {token} is the token")
    train.add_argument("--steps", type=int, default=0)
    train.add_argument("--batch-size", type=int, default=0)
    train.add_argument("--seed", type=int)
    train.add_argument("--checkpoint-every", type=int, default=0)
    train.add_argument("--sample-every", type=int, default=0)
    train.add_argument("--sample-prompt", action="append", help="repeat for several")
    train.add_argument("--masked-loss", action="store_true")
    train.add_argument("--gradient-checkpointing", action="store_true")
    train.add_argument(
        "--lr-scheduler", default="", choices=["", "constant", "cosine", "linear"],
        help="learning-rate schedule after the warmup (default constant, cosine for textual inversion; cosine and linear fall to 0 at the end)",
    )  # fmt: skip
    train.add_argument("--rank", type=int, default=0)
    train.add_argument("--alpha", type=float)
    train.add_argument("--train-text-encoder", action="store_true")
    train.add_argument("--conv", action="store_true", help="LoCon: also the ResNet convolutions")
    train.add_argument("--unet-lr", type=float)
    train.add_argument("--text-encoder-lr", type=float)
    train.add_argument("--class-prompt", default="", help="prior preservation (DreamBooth-LoRA, pivotal tuning), e.g. 'a shape'; '[filewords]' = each caption without the token")
    train.add_argument("--num-class-images", type=int, default=0)
    train.add_argument(
        "--extra-class-prompt", action="append",
        help="another class prompt (its class images hold what it draws), e.g. a prompt your users write; repeat for several",
    )  # fmt: skip
    train.add_argument("--class-prompt-file", help="a file of extra class prompts, one per line")
    train.add_argument("--prior-loss-weight", type=float)
    train.add_argument(
        "--prior-target", default="", choices=["", "noise", "base_model"],
        help="the class images' target: the added noise (default, as diffusers) or the base model's own prediction",
    )  # fmt: skip
    train.add_argument(
        "--token-contrast-weight", type=float,
        help="DreamBooth-LoRA / pivotal tuning: also hold the instance images, captioned without --token, to the base model's prediction (off by default)",
    )  # fmt: skip
    train.add_argument("--token", default="", help="textual inversion / pivotal tuning: the new token, e.g. '<pink>'; DreamBooth-LoRA: the instance token of the captions, e.g. 'sks'")
    train.add_argument("--initializer-token", default="")
    train.add_argument("--num-vectors", type=int, default=0)
    train.add_argument("--embedding-lr", type=float)
    train.add_argument("--embedding-steps", type=int, default=0)
    train.add_argument(
        "--train-lora-with-embedding", action="store_true",
        help="pivotal tuning: the LoRA trains beside the token from the first step (diffusers' order), not after it (lora_pti's)",
    )  # fmt: skip
    train.add_argument(
        "--text-encoder-only", action="store_true",
        help="no LoRA on the UNet: learn the concept through the text encoder (with --train-text-encoder; pivotal tuning adds the token)",
    )  # fmt: skip
    train.add_argument("--text-prior-prompt", action="append", help="a prompt whose text encoding the run holds to the base model's; repeat for several")
    train.add_argument("--text-prior-file", help="a file of such prompts, one per line")
    train.add_argument("--text-prior-weight", type=float)
    train.add_argument("--detach", action="store_true", help="print the job id and return; watch later with `impasto jobs --watch`")
    _watch_options(train)
    train.set_defaults(func=_train)

    jobs = subparsers.add_parser("jobs", help="list, watch or cancel training jobs on a running server")
    jobs.add_argument("--target", **target)
    jobs.add_argument("--watch", metavar="JOB_ID")
    jobs.add_argument("--cancel", metavar="JOB_ID")
    _watch_options(jobs)
    jobs.set_defaults(func=_jobs)

    prep = subparsers.add_parser("prep", help="prepare a training dataset folder: crop, captions, masks, metadata")
    prep.add_argument("source")
    prep.add_argument("--out", required=True)
    prep.add_argument("--size", type=int, default=64)
    prep.add_argument("--crop", choices=["center", "random", "bucket"], default="center")
    prep.add_argument("--caption", choices=["sidecar", "filename", "template"], default="sidecar")
    prep.add_argument("--template", default="a {token}")
    prep.add_argument("--token", default="")
    prep.add_argument("--masks", help="folder of masks named like the images")
    prep.add_argument("--min-size", type=int, default=0)
    prep.add_argument("--seed", type=int, default=0)
    prep.add_argument("--overwrite", action="store_true")
    prep.set_defaults(func=_prep)
