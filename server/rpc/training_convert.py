"""TrainingService messages <-> the core's plain dataclasses (training_methods / training_jobs)."""

from __future__ import annotations

from impasto.core.errors import InvalidArgument
from impasto.core.training_jobs import JobProgress, JobRecord, JobResumed, JobSample, JobState, JobStatus
from impasto.core.training_methods import TrainingSpec

from .pb import training_service_pb2 as pb

METHODS = {
    pb.TRAINING_METHOD_LORA: "lora",
    pb.TRAINING_METHOD_DREAMBOOTH_LORA: "dreambooth_lora",
    pb.TRAINING_METHOD_TEXTUAL_INVERSION: "textual_inversion",
    pb.TRAINING_METHOD_PIVOTAL_TUNING: "pivotal_tuning",
}
METHOD_VALUES = {v: k for k, v in METHODS.items()}
STATES = {
    JobState.QUEUED: pb.JOB_STATE_QUEUED,
    JobState.PREPARING: pb.JOB_STATE_PREPARING,
    JobState.RUNNING: pb.JOB_STATE_RUNNING,
    JobState.SUCCEEDED: pb.JOB_STATE_SUCCEEDED,
    JobState.FAILED: pb.JOB_STATE_FAILED,
    JobState.CANCELLED: pb.JOB_STATE_CANCELLED,
}


def _opt(message, name: str):
    return getattr(message, name) if message.HasField(name) else None


def training_spec(request: pb.StartTrainingRequest) -> TrainingSpec:
    if request.method not in METHODS:
        raise InvalidArgument("method", f"must be one of {', '.join(pb.TrainingMethod.Name(m) for m in METHODS)}")
    lora, db, ti = request.lora, request.dreambooth, request.textual_inversion
    return TrainingSpec(
        method=METHODS[request.method],
        dataset=request.dataset,
        adapter_name=request.adapter_name,
        model=request.model,
        instance_prompt=request.instance_prompt,
        num_steps=request.num_steps,
        batch_size=request.batch_size,
        seed=_opt(request, "seed"),
        checkpoint_every=request.checkpoint_every,
        sample_every=request.sample_every,
        sample_prompts=tuple(request.sample_prompts),
        masked_loss=request.masked_loss,
        gradient_checkpointing=request.gradient_checkpointing,
        lr_scheduler=request.lr_scheduler,
        rank=lora.rank,
        alpha=_opt(lora, "alpha"),
        train_text_encoder=lora.train_text_encoder,
        conv=lora.conv,
        unet_lr=_opt(lora, "unet_learning_rate"),
        text_encoder_lr=_opt(lora, "text_encoder_learning_rate"),
        text_encoder_only=lora.text_encoder_only,
        text_prior_prompts=tuple(lora.text_prior_prompts),
        text_prior_weight=_opt(lora, "text_prior_weight"),
        class_prompt=db.class_prompt,
        extra_class_prompts=tuple(db.extra_class_prompts),
        num_class_images=db.num_class_images,
        prior_loss_weight=_opt(db, "prior_loss_weight"),
        prior_target=db.prior_target,
        token_contrast_weight=_opt(db, "token_contrast_weight"),
        token=ti.token,
        initializer_token=ti.initializer_token,
        num_vectors=ti.num_vectors,
        embedding_lr=_opt(ti, "learning_rate"),
        embedding_steps=ti.embedding_steps,
        train_lora_with_embedding=ti.train_lora_with_embedding,
    )


def job_info(job: JobRecord) -> pb.JobInfo:
    return pb.JobInfo(
        job_id=job.job_id,
        method=METHOD_VALUES[job.spec.method],
        state=STATES[job.state],
        step=job.step,
        num_steps=job.num_steps,
        loss=job.loss,
        adapter_name=job.spec.adapter_name,
        adapter_id=job.adapter_id,
        message=job.message,
        resumed_from_step=job.resumed_from_step,
        created_unix=job.created,
        finished_unix=job.finished,
        outputs=sorted(job.outputs),
        dataset=job.spec.dataset,
        model=job.model,
    )


def watch_response(job_id: str, event) -> pb.WatchJobResponse:
    if isinstance(event, JobStatus):
        return pb.WatchJobResponse(job_id=job_id, status=job_info(event.job))
    if isinstance(event, JobProgress):
        return pb.WatchJobResponse(
            job_id=job_id,
            progress=pb.TrainingProgress(
                step=event.step,
                num_steps=event.num_steps,
                loss=event.loss,
                learning_rate=event.learning_rate,
                eta_seconds=event.eta_seconds,
                phase=event.phase,
            ),
        )
    if isinstance(event, JobSample):
        return pb.WatchJobResponse(job_id=job_id, sample=pb.TrainingSample(step=event.step, prompt=event.prompt, image=event.png, seed=event.seed))
    if isinstance(event, JobResumed):
        return pb.WatchJobResponse(job_id=job_id, resumed=pb.JobResumed(from_step=event.from_step))
    raise TypeError(f"unknown training event {event!r}")
