"""TrainingService for the clients: request builders and the typed events of a WatchJob stream.

    job_id = client.start_training("dreambooth_lora", dataset="stars", adapter_name="sks-star",
                                   instance_prompt="a sks shape", class_prompt="a shape", num_steps=300)
    for event in client.watch_job(job_id):
        ...  # JobStatus, TrainingProgress, TrainingSample, JobResumed
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from .pb import training_service_pb2 as pb

METHODS = {
    "lora": pb.TRAINING_METHOD_LORA,
    "dreambooth_lora": pb.TRAINING_METHOD_DREAMBOOTH_LORA,
    "textual_inversion": pb.TRAINING_METHOD_TEXTUAL_INVERSION,
    "pivotal_tuning": pb.TRAINING_METHOD_PIVOTAL_TUNING,
}
STATES = {
    pb.JOB_STATE_QUEUED: "queued",
    pb.JOB_STATE_PREPARING: "preparing",
    pb.JOB_STATE_RUNNING: "running",
    pb.JOB_STATE_SUCCEEDED: "succeeded",
    pb.JOB_STATE_FAILED: "failed",
    pb.JOB_STATE_CANCELLED: "cancelled",
}
FINAL_STATES = ("succeeded", "failed", "cancelled")
MAX_UPLOAD_FILE_BYTES = 32 * 1024 * 1024


@dataclass(frozen=True)
class JobStatus:
    job_id: str
    state: str  # queued, preparing, running, succeeded, failed, cancelled
    step: int
    num_steps: int
    loss: float
    adapter_name: str
    adapter_id: str
    message: str
    resumed_from_step: int
    outputs: tuple[str, ...]

    @property
    def finished(self) -> bool:
        return self.state in FINAL_STATES


@dataclass(frozen=True)
class TrainingProgress:
    job_id: str
    step: int
    num_steps: int
    loss: float
    learning_rate: float
    eta_seconds: float
    phase: str


@dataclass(frozen=True)
class TrainingSample:
    job_id: str
    step: int
    prompt: str
    image: bytes  # PNG
    seed: int


@dataclass(frozen=True)
class JobResumed:
    job_id: str
    from_step: int


TrainingEvent = JobStatus | TrainingProgress | TrainingSample | JobResumed


def job_status(info: pb.JobInfo) -> JobStatus:
    return JobStatus(
        info.job_id, STATES.get(info.state, "unspecified"), info.step, info.num_steps, info.loss, info.adapter_name,
        info.adapter_id, info.message, info.resumed_from_step, tuple(info.outputs),
    )


def from_watch_response(response: pb.WatchJobResponse) -> TrainingEvent:
    kind = response.WhichOneof("event")
    jid = response.job_id
    if kind == "status":
        return job_status(response.status)
    if kind == "progress":
        p = response.progress
        return TrainingProgress(jid, p.step, p.num_steps, p.loss, p.learning_rate, p.eta_seconds, p.phase)
    if kind == "sample":
        s = response.sample
        return TrainingSample(jid, s.step, s.prompt, s.image, s.seed)
    if kind == "resumed":
        return JobResumed(jid, response.resumed.from_step)
    raise ValueError(f"unknown event in response: {kind!r} (is the client older than the server?)")


def dataset_requests(name: str, source) -> Iterator[pb.UploadDatasetRequest]:
    """The UploadDataset stream: the header, then one message per file.

    `source`: a folder (its files, up to three levels deep, hidden ones skipped) or a dict
    {relative path: bytes}."""
    yield pb.UploadDatasetRequest(header=pb.UploadDatasetHeader(name=name))
    if isinstance(source, dict):
        items = sorted(source.items())
        for path, data in items:
            yield pb.UploadDatasetRequest(file=pb.DatasetFile(path=path, data=bytes(data)))
        return
    root = Path(source)
    if not root.is_dir():
        raise ValueError(f"{root} is not a folder")
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root)
        if not path.is_file() or any(p.startswith(".") for p in rel.parts):
            continue
        if os.path.getsize(path) > MAX_UPLOAD_FILE_BYTES:
            raise ValueError(f"{path} is over {MAX_UPLOAD_FILE_BYTES} bytes; datasets are images of a few MB at most")
        yield pb.UploadDatasetRequest(file=pb.DatasetFile(path=rel.as_posix(), data=path.read_bytes()))


def start_request(
    method: str,
    *,
    dataset: str,
    adapter_name: str,
    model: str = "",
    instance_prompt: str = "",
    num_steps: int = 0,
    batch_size: int = 0,
    seed: int | None = None,
    checkpoint_every: int = 0,
    sample_every: int = 0,
    sample_prompts: list[str] | None = None,
    masked_loss: bool = False,
    gradient_checkpointing: bool = False,
    lr_scheduler: str = "",
    rank: int = 0,
    alpha: float | None = None,
    train_text_encoder: bool = False,
    conv: bool = False,
    unet_lr: float | None = None,
    text_encoder_lr: float | None = None,
    class_prompt: str = "",
    extra_class_prompts: list[str] | None = None,
    num_class_images: int = 0,
    prior_loss_weight: float | None = None,
    prior_target: str = "",
    token_contrast_weight: float | None = None,
    token: str = "",
    initializer_token: str = "",
    num_vectors: int = 0,
    embedding_lr: float | None = None,
    embedding_steps: int = 0,
    train_lora_with_embedding: bool = False,
    text_encoder_only: bool = False,
    text_prior_prompts: list[str] | None = None,
    text_prior_weight: float | None = None,
) -> pb.StartTrainingRequest:
    if method not in METHODS:
        raise ValueError(f"method must be one of {sorted(METHODS)}, got {method!r}")
    request = pb.StartTrainingRequest(
        method=METHODS[method], model=model, dataset=dataset, adapter_name=adapter_name, instance_prompt=instance_prompt,
        num_steps=num_steps, batch_size=batch_size, checkpoint_every=checkpoint_every, sample_every=sample_every,
        sample_prompts=sample_prompts or [], masked_loss=masked_loss, gradient_checkpointing=gradient_checkpointing,
        lr_scheduler=lr_scheduler,
        lora=pb.LoraOptions(
            rank=rank, train_text_encoder=train_text_encoder, conv=conv, text_encoder_only=text_encoder_only,
            text_prior_prompts=text_prior_prompts or [],
        ),
        dreambooth=pb.DreamBoothOptions(
            class_prompt=class_prompt, num_class_images=num_class_images, extra_class_prompts=extra_class_prompts or [], prior_target=prior_target,
        ),
        textual_inversion=pb.TextualInversionOptions(
            token=token, initializer_token=initializer_token, num_vectors=num_vectors, embedding_steps=embedding_steps,
            train_lora_with_embedding=train_lora_with_embedding,
        ),
    )  # fmt: skip
    if seed is not None:
        request.seed = seed
    if alpha is not None:
        request.lora.alpha = alpha
    if text_prior_weight is not None:
        request.lora.text_prior_weight = text_prior_weight
    if unet_lr is not None:
        request.lora.unet_learning_rate = unet_lr
    if text_encoder_lr is not None:
        request.lora.text_encoder_learning_rate = text_encoder_lr
    if prior_loss_weight is not None:
        request.dreambooth.prior_loss_weight = prior_loss_weight
    if token_contrast_weight is not None:
        request.dreambooth.token_contrast_weight = token_contrast_weight
    if embedding_lr is not None:
        request.textual_inversion.learning_rate = embedding_lr
    return request
