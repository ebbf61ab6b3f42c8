"""A training job survives a kill -9 of its server: the next server process on the same data
directory resumes it from its last checkpoint, says so on the job's stream, finishes it with
nothing half-written left behind, registers its adapter for Generate, and the adapter equals,
bit for bit, that of the same job run without interruption.

The server runs as a separate OS process (server_process.py): only then is the kill a real
crash, with no shutdown code run. test_training_jobs.py covers the graceful-stop case.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load as load_safetensors
from server_process import ServerProcesses

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "unit"))
from training_fixtures import write_shapes  # noqa: E402

from impasto_client import Image, ImpastoClient  # noqa: E402
from impasto_client.training import JobResumed, JobStatus, TrainingProgress  # noqa: E402

NUM_STEPS = 60
CHECKPOINT_EVERY = 5
# The kill lands a step or two after the first checkpoint; the many steps after it are margin, so
# that the job is still far from its end when the kill lands, even on a busy machine (the test
# says so plainly if it was not).
OPTIONS = dict(dataset="stars", instance_prompt="a sks shape", num_steps=NUM_STEPS, batch_size=2, rank=2, checkpoint_every=CHECKPOINT_EVERY, seed=5)
WATCH_TIMEOUT_S = 300.0

pytestmark = pytest.mark.slow  # two server starts and two 60-step jobs: 15-35 s on a shared 2-core CPU


def star_folder(tmp_path: Path) -> Path:
    return write_shapes(tmp_path / "stars", [("star", "red"), ("star", "blue")], ["a red sks shape", "a blue sks shape"])


def watch_until_step(client: ImpastoClient, job_id: str, step: int) -> None:
    """Returns once the job has reported `step` (leaving the stream cancels it)."""
    for event in client.watch_job(job_id, timeout=WATCH_TIMEOUT_S):
        if isinstance(event, TrainingProgress) and event.step >= step:
            return
        if isinstance(event, JobStatus) and event.finished:
            raise AssertionError(f"the job ended before step {step}: {event}")
    raise AssertionError(f"the job's stream ended before step {step}")


def partial_writes(folder: Path) -> list[Path]:
    """Temp files of the atomic writers (all dot-named: `.job.json.*.tmp`, `.checkpoint.*.tmp`,
    `.upload-*`), which only a write cut short leaves behind."""
    return sorted(p for p in folder.rglob("*") if p.name.startswith(".") or p.name.endswith(".tmp"))


def adapter_tensors(client: ImpastoClient, job_id: str) -> dict[str, torch.Tensor]:
    _, blob = client.download_job_output(job_id, "kohya", timeout=60)
    return load_safetensors(blob)


def test_a_job_killed_with_sigkill_resumes_from_its_checkpoint_and_matches_an_uninterrupted_run(tmp_path):
    data = tmp_path / "data"
    with ServerProcesses(tmp_path / "logs") as servers:
        first = servers.start(data)
        with ImpastoClient(first.target) as client:
            client.upload_dataset("stars", star_folder(tmp_path), timeout=60)
            job_id = client.start_training("lora", adapter_name="after-kill", **OPTIONS)
            # The worker thread emits step k's progress, then writes step k's checkpoint, then
            # trains step k+1: so once step CHECKPOINT_EVERY + 1 is reported, a checkpoint is on disk.
            watch_until_step(client, job_id, CHECKPOINT_EVERY + 1)
            first.kill()
        job_dir = data / "training" / "jobs" / job_id

        record = json.loads((job_dir / "job.json").read_text())
        assert record["state"] == "running", f"the kill was meant to land mid-job; raise NUM_STEPS if the job got further: {record}"
        # What the next server will resume from. Read from the checkpoint itself: job.json is
        # rewritten just after it, so a kill between the two leaves job.json one checkpoint behind.
        from_step = torch.load(job_dir / "checkpoint.pt", weights_only=True)["step"]
        assert CHECKPOINT_EVERY <= from_step < NUM_STEPS and from_step % CHECKPOINT_EVERY == 0

        second = servers.start(data)
        with ImpastoClient(second.target) as client:
            assert job_id in [job.job_id for job in client.list_jobs()]
            events = list(client.watch_job(job_id, timeout=WATCH_TIMEOUT_S))

            # The stream says the job resumed, and from which step.
            resumed = [e for e in events if isinstance(e, JobResumed)]
            assert resumed and {e.from_step for e in resumed} == {from_step}, events[:5]
            final = events[-1]
            assert isinstance(final, JobStatus) and final.state == "succeeded", final
            assert final.resumed_from_step == from_step and final.step == NUM_STEPS

            # The step count goes on from the checkpoint, not from 0. A stream opened before the
            # resumed job's first step (state still queued or preparing) sees every step it trains.
            steps = [e.step for e in events if isinstance(e, TrainingProgress)]
            assert steps and steps == list(range(steps[0], NUM_STEPS + 1)) and steps[0] > from_step, steps
            if events[0].state in ("queued", "preparing"):
                assert steps[0] == from_step + 1, (events[0], steps[:3])

            # Registered: the very next Generate can use it.
            assert "after-kill" in [adapter.name for adapter in client.list_adapters()]
            images = [e for e in client.generate("a red sks shape <lora:after-kill:1>", seed=1, num_steps=4, timeout=120) if isinstance(e, Image)]
            assert len(images) == 1 and "after-kill" in images[0].infotext

            # Nothing half-written: no temp file of any writer, and the checkpoint is gone.
            assert partial_writes(data / "training") == [] and partial_writes(data / "adapters") == []
            assert not (job_dir / "checkpoint.pt").exists()

            # The resumed run continues bit for bit (FineTuner.state_dict holds the trainable
            # tensors, optimizer, LR schedule and random generator): the same job, never killed,
            # trains the very same adapter. (So the registry, which keeps one name per content,
            # does not register it a second time; the job still succeeds, and says so.)
            straight_id = client.start_training("lora", adapter_name="uninterrupted", **OPTIONS)
            straight_final = list(client.watch_job(straight_id, timeout=WATCH_TIMEOUT_S))[-1]
            assert isinstance(straight_final, JobStatus) and straight_final.state == "succeeded", straight_final
            assert straight_final.resumed_from_step == 0
            after_kill, straight = adapter_tensors(client, job_id), adapter_tensors(client, straight_id)
            assert after_kill.keys() == straight.keys()
            differ = [key for key in straight if not torch.equal(after_kill[key], straight[key])]
            assert differ == [], f"{len(differ)} of {len(straight)} tensors differ, e.g. {differ[:3]}"
