"""Training jobs: queued, run one at a time beside serving, checkpointed, resumed after a crash.

Layout under `<data dir>/training/jobs/<job id>/`:

    job.json          the record (spec, state, step, ...), rewritten atomically on every change
    checkpoint.pt     the trainer's state at the last checkpoint step (temp file + os.replace)
    class_images/     DreamBooth's class images, generated once by this server's step loop
    outputs/          the adapter as kohya / diffusers / PEFT / embeddings files

How a job shares the machine with serving:
- it trains on its own copy of the base model, loaded from the model's folder: the engines
  that serve requests are never touched, so a Generate during training is unaffected;
- before every step it waits while the step loop has requests (at most
  `training.max_yield_wait_s`, then it runs one step anyway: aging, as the scheduler does for
  batch work), so serving goes first between training steps;
- DreamBooth's class images are ordinary Generate requests at `Priority.TRAINING`, below
  batch work, through the same step loop (no second pipeline).

A crash (kill -9) leaves job.json in a non-final state; the next server on the same data
directory queues the job again and its trainer resumes from checkpoint.pt. The WatchJob stream
then carries `JobResumed(from_step)`. Stopping the server does the same on purpose: a job is
only ever ended by finishing, failing or being cancelled.

When a job finishes, its adapter is written in every format and registered in the adapter
registry (exactly as an upload is), so the next Generate can name it. A LoRA or pivotal-tuning
adapter is registered from its kohya file (LoRA and bundled token in one); a textual inversion
from its diffusers-style embeddings file, which keeps the trained token (A1111's embedding file,
the kohya output, holds none).
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import logging
import os
import shutil
import tempfile
import threading
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace
from enum import Enum
from pathlib import Path

from impasto.lora.files import write_json

from .errors import AlreadyExists, InvalidArgument, NotFound
from .training_datasets import DatasetStore
from .training_methods import TrainingSpec, build_trainer, validate_spec

log = logging.getLogger(__name__)

CHECKPOINT = "checkpoint.pt"
RECORD = "job.json"


class JobState(str, Enum):
    QUEUED = "queued"
    PREPARING = "preparing"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


FINAL = (JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED)


@dataclass
class JobRecord:
    job_id: str
    spec: TrainingSpec
    state: JobState = JobState.QUEUED
    step: int = 0
    num_steps: int = 0
    loss: float = 0.0
    seed: int = 0
    model: str = ""  # the resolved model name
    adapter_id: str = ""
    message: str = ""
    resumed_from_step: int = 0
    checkpoint_step: int = 0
    created: float = 0.0
    finished: float = 0.0
    outputs: dict[str, str] = field(default_factory=dict)  # output name -> file name in outputs/

    def to_json(self) -> dict:
        d = {k: v for k, v in self.__dict__.items()}
        d["spec"] = self.spec.to_json()
        d["state"] = self.state.value
        return d

    @classmethod
    def from_json(cls, d: dict) -> "JobRecord":
        d = dict(d)
        d["spec"] = TrainingSpec.from_json(d["spec"])
        d["state"] = JobState(d["state"])
        return cls(**d)


# Events a WatchJob stream carries, in order: JobStatus first, then any of the others, and a
# final JobStatus whose state is final.
@dataclass(frozen=True)
class JobStatus:
    job: JobRecord


@dataclass(frozen=True)
class JobProgress:
    step: int
    num_steps: int
    loss: float
    learning_rate: float
    eta_seconds: float
    phase: str


@dataclass(frozen=True)
class JobSample:
    step: int
    prompt: str
    png: bytes
    seed: int


@dataclass(frozen=True)
class JobResumed:
    from_step: int


JobEvent = JobStatus | JobProgress | JobSample | JobResumed


def _remove_partial_writes(folder: Path) -> None:
    """Drop what a crash mid-write left in a job's folder. The job's atomic writers (checkpoint,
    job.json, class images, the safetensors outputs) write `.<name>.<random>.tmp` and then rename
    it over the final name, so such a temp never holds anything the job needs. Not only the
    checkpoint's: job.json is rewritten on every state change and checkpoint, so a kill -9 can
    land in its write too."""
    for leftover in list(folder.rglob(".*.tmp")):
        if leftover.is_dir():
            shutil.rmtree(leftover, ignore_errors=True)
        else:
            leftover.unlink(missing_ok=True)


class _Stopping(Exception):
    """The server is stopping: leave the job as a crash would, to be resumed."""


class _Cancelled(Exception):
    pass


class TrainingJobs:
    def __init__(self, config, engine):
        self.config = config.training
        self.engine = engine
        self.data_dir = Path(config.resolved_data_dir)
        self.jobs_dir = self.data_dir / "training" / "jobs"
        self.datasets = DatasetStore(self.data_dir, self.config.max_dataset_bytes)
        self._jobs: dict[str, JobRecord] = {}
        self._queue: list[str] = []
        self._cancel: set[str] = set()
        self._subscribers: dict[str, list[tuple[asyncio.AbstractEventLoop, asyncio.Queue]]] = {}
        self._lock = threading.RLock()
        self._wake = threading.Condition(self._lock)
        self._stopping = False
        self._workers: list[threading.Thread] = []
        self._loop: asyncio.AbstractEventLoop | None = None

    # --- lifecycle ----------------------------------------------------------------------------
    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        """Read the jobs of earlier runs; queue again those that had not ended; start workers."""
        self._loop = loop
        for path in sorted(self.jobs_dir.glob(f"*/{RECORD}")) if self.jobs_dir.is_dir() else []:
            try:
                job = JobRecord.from_json(json.loads(path.read_text(encoding="utf-8")))
            except (OSError, ValueError, TypeError, KeyError) as exc:
                log.warning("training job record %s is unreadable, skipped: %s", path, exc)
                continue
            self._jobs[job.job_id] = job
        for job in sorted(self._jobs.values(), key=lambda j: j.created):
            if job.state not in FINAL:
                _remove_partial_writes(self._dir(job))
                job.state = JobState.QUEUED
                self._save(job)
                self._queue.append(job.job_id)
                log.info("training job %s queued again (checkpoint at step %d)", job.job_id, job.checkpoint_step)
        for i in range(self.config.max_running_jobs):
            worker = threading.Thread(target=self._work, name=f"impasto-training-{i}", daemon=True)
            worker.start()
            self._workers.append(worker)

    def stop(self, timeout: float = 30.0) -> None:
        with self._wake:
            self._stopping = True
            self._wake.notify_all()
        for worker in self._workers:
            worker.join(timeout)

    # --- requests -----------------------------------------------------------------------------
    def submit(self, spec: TrainingSpec) -> tuple[JobRecord, int]:
        """Check and queue a job; (its record, how many jobs run or wait before it)."""
        validate_spec(spec)
        self.datasets.resolve(spec.dataset)
        self.engine.adapters.check_name(spec.adapter_name, field="adapter_name")
        try:
            entry = self.engine.registry.resolve(spec.model)
        except NotFound as exc:
            raise InvalidArgument("model", str(exc).removeprefix("model: ")) from None
        with contextlib.suppress(NotFound):
            holder = self.engine.adapters.resolve(spec.adapter_name)
            raise InvalidArgument("adapter_name", f"'{spec.adapter_name}' is taken by adapter {holder.id}; choose another name")
        with self._wake:
            busy = [j for j in self._jobs.values() if j.state not in FINAL and j.spec.adapter_name == spec.adapter_name]
            if busy:
                raise InvalidArgument("adapter_name", f"'{spec.adapter_name}' is the name of job {busy[0].job_id}, not finished yet")
            seed = spec.seed if spec.seed is not None else int.from_bytes(os.urandom(4), "little")
            job = JobRecord(uuid.uuid4().hex[:16], spec, seed=seed, model=entry.name, num_steps=spec.resolved_steps, created=time.time())
            self._jobs[job.job_id] = job
            self._save(job)
            position = sum(1 for j in self._jobs.values() if j.state in (JobState.PREPARING, JobState.RUNNING)) + len(self._queue)
            self._queue.append(job.job_id)
            self._wake.notify()
        log.info("training job %s queued: %s on %s -> adapter %s", job.job_id, spec.method, spec.dataset, spec.adapter_name)
        return self._copy(job), position

    def get(self, job_id: str) -> JobRecord:
        with self._lock:
            job = self._jobs.get(job_id)
            if job is None:
                raise NotFound(f"job: no training job {job_id!r}")
            return self._copy(job)

    def list(self) -> list[JobRecord]:
        with self._lock:
            return [self._copy(j) for j in sorted(self._jobs.values(), key=lambda j: j.created)]

    def cancel(self, job_id: str) -> JobRecord:
        with self._wake:
            job = self._jobs.get(job_id)
            if job is None:
                raise NotFound(f"job: no training job {job_id!r}")
            if job.state in FINAL:
                return self._copy(job)
            if job_id in self._queue:
                self._queue.remove(job_id)
                self._end(job, JobState.CANCELLED, "cancelled while queued")
            else:
                self._cancel.add(job_id)  # the worker ends it at its next step
            return self._copy(job)

    def output_file(self, job_id: str, output: str) -> Path:
        job = self.get(job_id)
        if output not in job.outputs:
            raise NotFound(f"output: job {job_id} has no output {output!r}; it has: {', '.join(job.outputs) or 'none yet'}")
        return self.jobs_dir / job_id / "outputs" / job.outputs[output]

    async def watch(self, job_id: str) -> AsyncIterator[JobEvent]:
        queue: asyncio.Queue = asyncio.Queue()
        subscriber = (asyncio.get_running_loop(), queue)
        with self._lock:
            job = self._jobs.get(job_id)
            if job is None:
                raise NotFound(f"job: no training job {job_id!r}")
            snapshot = self._copy(job)
            self._subscribers.setdefault(job_id, []).append(subscriber)
        try:
            yield JobStatus(snapshot)
            if snapshot.resumed_from_step:
                yield JobResumed(snapshot.resumed_from_step)
            if snapshot.state in FINAL:
                return
            while True:
                event = await queue.get()
                yield event
                if isinstance(event, JobStatus) and event.job.state in FINAL:
                    return
        finally:
            with self._lock:
                subs = self._subscribers.get(job_id, [])
                if subscriber in subs:
                    subs.remove(subscriber)

    # --- bookkeeping --------------------------------------------------------------------------
    @staticmethod
    def _copy(job: JobRecord) -> JobRecord:
        return replace(job, outputs=dict(job.outputs))

    def _dir(self, job: JobRecord) -> Path:
        return self.jobs_dir / job.job_id

    def _save(self, job: JobRecord) -> None:
        write_json(self._dir(job) / RECORD, job.to_json())

    def _emit(self, job: JobRecord, event: JobEvent, subscribers: list | None = None) -> None:
        """Send `event` to the job's watchers. A change that a watcher's snapshot also shows
        passes the `subscribers` it read under the lock that made the change: a watcher then
        either subscribed before (its snapshot is older; it gets the event) or after (its
        snapshot has the change; it does not), never both."""
        if subscribers is None:
            with self._lock:
                subscribers = list(self._subscribers.get(job.job_id, []))
        for loop, queue in subscribers:
            with contextlib.suppress(RuntimeError):  # that watcher's event loop is closed
                loop.call_soon_threadsafe(queue.put_nowait, event)

    def _set_state(self, job: JobRecord, state: JobState, message: str = "") -> None:
        with self._lock:
            job.state, job.message = state, message
            self._save(job)
            snapshot = self._copy(job)
            subscribers = list(self._subscribers.get(job.job_id, []))
        self._emit(job, JobStatus(snapshot), subscribers)

    def _end(self, job: JobRecord, state: JobState, message: str = "") -> None:
        job.finished = time.time()
        self._set_state(job, state, message)
        log.info("training job %s %s%s", job.job_id, state.value, f": {message}" if message else "")

    # --- the worker ---------------------------------------------------------------------------
    def _work(self) -> None:
        while True:
            with self._wake:
                while not self._queue and not self._stopping:
                    self._wake.wait()
                if self._stopping:
                    return
                job = self._jobs[self._queue.pop(0)]
            try:
                self._run(job)
            except _Stopping:
                log.info("training job %s left at step %d for the next server (checkpoint at %d)", job.job_id, job.step, job.checkpoint_step)
                return
            except _Cancelled:
                self._end(job, JobState.CANCELLED, f"cancelled at step {job.step}")
            except Exception as exc:
                if self._stopping:
                    return
                log.exception("training job %s failed", job.job_id)
                self._end(job, JobState.FAILED, f"{type(exc).__name__}: {exc}")
            finally:
                with self._lock:
                    self._cancel.discard(job.job_id)

    def _check(self, job: JobRecord) -> None:
        if self._stopping:
            raise _Stopping()
        if job.job_id in self._cancel:
            raise _Cancelled()

    def _run(self, job: JobRecord) -> None:
        import torch

        spec, folder = job.spec, self._dir(job)
        self._set_state(job, JobState.PREPARING)
        entry = self.engine.registry.resolve(job.model)
        dataset = self.datasets.resolve(spec.dataset)
        tuner = build_trainer(
            spec,
            seed=job.seed,
            model_dir=entry.path,
            dataset_dir=dataset,
            job_dir=folder,
            class_images=lambda items: self._class_images(job, items),
        )
        for name, reason in getattr(tuner, "skipped", []):
            log.warning("training job %s: skipped %s: %s", job.job_id, name, reason)
        checkpoint = folder / CHECKPOINT
        if checkpoint.is_file():
            tuner.load_state_dict(torch.load(checkpoint, weights_only=True))
            with self._lock:
                job.resumed_from_step = tuner.step
                job.step = tuner.step
                subscribers = list(self._subscribers.get(job.job_id, []))
            log.info("training job %s resumed from step %d", job.job_id, tuner.step)
            self._emit(job, JobResumed(tuner.step), subscribers)
        job.num_steps = tuner.num_steps
        self._set_state(job, JobState.RUNNING)
        every = spec.checkpoint_every or self.config.checkpoint_every
        while not tuner.done:
            self._check(job)
            self._yield_to_serving(job)
            result = tuner.train_step()
            job.step, job.loss = result.step, tuner.running_loss or result.loss
            self._emit(job, JobProgress(result.step, tuner.num_steps, job.loss, result.learning_rate, tuner.eta_seconds(), result.phase))
            if result.step % every == 0 and not tuner.done:
                self._checkpoint(job, tuner)
            if spec.sample_every and result.step % spec.sample_every == 0:
                self._samples(job, tuner)
        self._check(job)
        self._finish(job, tuner)

    def _yield_to_serving(self, job: JobRecord) -> None:
        """Wait while the step loop has requests to run (at most max_yield_wait_s)."""
        scheduler = self.engine.step_loop.scheduler
        deadline = time.monotonic() + self.config.max_yield_wait_s
        while scheduler.has_work() and time.monotonic() < deadline:
            self._check(job)
            time.sleep(0.005)

    def _checkpoint(self, job: JobRecord, tuner) -> None:
        import torch

        path = self._dir(job) / CHECKPOINT
        fd, tmp = tempfile.mkstemp(prefix=".checkpoint.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        try:
            torch.save(tuner.state_dict(), tmp)
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        with self._lock:
            job.checkpoint_step = tuner.step
            self._save(job)

    def _samples(self, job: JobRecord, tuner) -> None:
        prompts = job.spec.sample_prompt_list()
        images = tuner.sample(prompts, seed=job.seed)
        for prompt, image in zip(prompts, images):
            buffer = io.BytesIO()
            image.save(buffer, format="PNG")
            self._emit(job, JobSample(job.step, prompt, buffer.getvalue(), job.seed))

    def _class_images(self, job: JobRecord, items: list[tuple[str, int]]) -> list:
        """Class images [(prompt, seed)] from this server's own step loop, at training priority.
        All are submitted at once, as requests of their own (runs of one prompt with
        consecutive seeds share one, image k getting seed + k): the scheduler batches their
        steps, where one prompt at a time ran [filewords]' and extra class prompts' one or
        two images a batch."""
        import numpy as np
        from PIL import Image

        from .spec import GenerationSpec, ImageReady, Priority

        self._check(job)
        limit = self.engine.config.limits.max_images_per_request
        runs: list[tuple[str, int, int]] = []  # prompt, first seed, images
        for prompt, seed in items:
            if runs and runs[-1][0] == prompt and runs[-1][1] + runs[-1][2] == seed and runs[-1][2] < limit:
                runs[-1] = (prompt, runs[-1][1], runs[-1][2] + 1)
            else:
                runs.append((prompt, seed, 1))

        async def one(prompt: str, seed: int, n: int) -> list:
            spec = GenerationSpec(prompt=prompt, model=job.model, seed=seed, num_images=n, priority=Priority.TRAINING)
            out = []
            async for event in self.engine.generate(spec):
                if isinstance(event, ImageReady):
                    out.append((event.index, np.asarray(Image.open(io.BytesIO(event.data)).convert("RGB"))))
            return [pixels for _, pixels in sorted(out, key=lambda pair: pair[0])]

        async def collect():
            results = await asyncio.gather(*(one(*run) for run in runs))
            return [pixels for images in results for pixels in images]

        return asyncio.run_coroutine_threadsafe(collect(), self._loop).result()

    def _finish(self, job: JobRecord, tuner) -> None:
        from impasto.training.outputs import write_outputs

        from .adapter_weights import base_weight_shapes

        spec = job.spec
        adapter = tuner.adapter()
        metadata = {
            "ss_network_dim": str(max(adapter.ranks, default=0)),
            "impasto_training_method": spec.method,
            "impasto_training_steps": str(tuner.step),
            "impasto_base_model": job.model,
        }
        adapter.metadata.update(metadata)
        files = write_outputs(adapter, self._dir(job) / "outputs", spec.adapter_name, metadata)
        with self._lock:
            job.outputs = {name: path.name for name, path in files.items()}
            job.step = tuner.step
        # Register it as an upload would be: the same checks, the same store.
        model = self.engine.registry.load(job.model)
        shapes = base_weight_shapes(model.engines.unet, "unet") | base_weight_shapes(model.engines.text_encoder, "text_encoder")
        source, source_format = (files["kohya"], "kohya") if adapter.modules else (files["embeddings"], "embedding")
        upload = self.engine.adapters.new_upload_path()
        upload.write_bytes(source.read_bytes())
        try:
            record, _ = self.engine.adapters.add(upload, name=spec.adapter_name, format=source_format, model=job.model, named_weight_shapes=shapes)
        except (InvalidArgument, AlreadyExists) as exc:
            # e.g. the name was taken by an upload while the job ran, or the very same weights
            # are stored under another name (the registry keeps one name per content; both are
            # AlreadyExists): the files are there to download, but Generate cannot use them under
            # this name. Said, not hidden; the training itself succeeded.
            self._drop_checkpoint(job)
            self._end(job, JobState.SUCCEEDED, f"trained; not registered for serving: {exc}")
            return
        self._drop_checkpoint(job)
        job.adapter_id = record.id
        self._end(job, JobState.SUCCEEDED)

    def _drop_checkpoint(self, job: JobRecord) -> None:
        """After the outputs are written: a finished job is never resumed, so its checkpoint
        (the size of the trainable state plus the optimizer's) would only take disk."""
        with contextlib.suppress(FileNotFoundError):
            (self._dir(job) / CHECKPOINT).unlink()
