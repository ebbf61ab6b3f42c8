"""Training jobs on a real server: resume after the server goes away mid-job, one job at a time,
cancel, and DreamBooth's class images made by the server's own step loop."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import running_server

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "unit"))
from training_fixtures import write_shapes  # noqa: E402

from impasto_client import Image, ImpastoClient  # noqa: E402
from impasto_client.training import JobResumed, JobStatus, TrainingProgress  # noqa: E402


@pytest.fixture(autouse=True)
def single_torch_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def dataset(data: Path, name: str = "stars") -> str:
    write_shapes(data / "datasets" / name, [("star", "red"), ("star", "blue")], ["a red sks shape", "a blue sks shape"])
    return name


def wait_for(predicate, timeout: float = 120.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise TimeoutError("condition not reached")


def test_a_job_resumes_from_its_checkpoint_on_a_new_server(tmp_path):
    data = tmp_path / "data"
    options = dict(dataset=dataset(data), adapter_name="resumed", instance_prompt="a sks shape", num_steps=40, batch_size=1, rank=2, checkpoint_every=3, seed=5)
    with running_server(data_dir=data) as server:
        with ImpastoClient(server.target) as client:
            job_id = client.start_training("lora", **options)
            wait_for(lambda: client.get_job(job_id).step >= 7)
        # The server goes away mid-job, as after a crash: the job is not ended, only left.
    record = json.loads((data / "training" / "jobs" / job_id / "job.json").read_text())
    assert record["state"] == "running" and 6 <= record["checkpoint_step"] < 40
    checkpoint_step = record["checkpoint_step"]

    with running_server(data_dir=data) as server:
        with ImpastoClient(server.target) as client:
            events = list(client.watch_job(job_id, timeout=300))
            progress = [e for e in events if isinstance(e, TrainingProgress)]
            resumed = [e for e in events if isinstance(e, JobResumed)]
            assert [r.from_step for r in resumed] == [checkpoint_step]  # said once
            assert progress and progress[-1].step == 40
            assert all(p.step > checkpoint_step for p in progress)
            final = events[-1]
            assert isinstance(final, JobStatus) and final.state == "succeeded" and final.resumed_from_step == checkpoint_step
            assert not (data / "training" / "jobs" / job_id / "checkpoint.pt").exists()


def test_a_job_whose_name_is_taken_succeeds_unregistered_and_keeps_no_checkpoint(tmp_path):
    """An upload took the name while the job ran: the files are there to download, the stream
    says why Generate can't use them, and the checkpoint is gone."""
    from adapter_files import write_kohya

    data = tmp_path / "data"
    options = dict(dataset=dataset(data), adapter_name="taken", instance_prompt="a sks shape", batch_size=1, rank=1)
    with running_server(data_dir=data) as server:
        with ImpastoClient(server.target) as client:
            job_id = client.start_training("lora", num_steps=30, checkpoint_every=1, seed=1, **options)
            wait_for(lambda: client.get_job(job_id).step >= 2)
            client.upload_adapter(write_kohya(tmp_path / "other.safetensors", seed=3), "taken")
            final = list(client.watch_job(job_id, timeout=300))[-1]
            assert final.state == "succeeded" and "not registered for serving" in final.message and not final.adapter_id
            assert "kohya" in final.outputs and client.download_job_output(job_id, "kohya")[1]
            assert not (data / "training" / "jobs" / job_id / "checkpoint.pt").exists()


def test_jobs_run_one_at_a_time_and_cancel(tmp_path):
    data = tmp_path / "data"
    name = dataset(data)
    with running_server(data_dir=data) as server:
        with ImpastoClient(server.target) as client:
            long = client.start_training("lora", dataset=name, adapter_name="long", num_steps=2000, batch_size=1, rank=1, instance_prompt="a sks shape")
            queued = client.start_training("lora", dataset=name, adapter_name="queued", num_steps=2, batch_size=1, rank=1, instance_prompt="a sks shape")
            wait_for(lambda: client.get_job(long).step >= 1)
            assert client.get_job(queued).state == "queued"
            assert client.cancel_job(queued).state == "cancelled"
            client.cancel_job(long)
            wait_for(lambda: client.get_job(long).state == "cancelled")
            assert "long" not in [a.name for a in client.list_adapters()]


@pytest.mark.parametrize("method", ["dreambooth_lora", "pivotal_tuning"])
def test_prior_class_images_come_from_the_server_and_serving_goes_on(tmp_path, method):
    data = tmp_path / "data"
    name = dataset(data)
    # Pivotal tuning's captions name its new token; DreamBooth binds a word the tokenizer has.
    token = dict(token="<sks>", initializer_token="shape", embedding_steps=2) if method == "pivotal_tuning" else {}
    instance_prompt = "a {token} shape" if token else "a sks shape"
    if token:
        name = "token-stars"
        write_shapes(data / "datasets" / name, [("star", "red"), ("star", "blue")], ["a red {token} shape", "a blue {token} shape"])
    with running_server(data_dir=data) as server:
        with ImpastoClient(server.target) as client:
            job_id = client.start_training(
                method, dataset=name, adapter_name="db", instance_prompt=instance_prompt, class_prompt="a shape",
                num_class_images=2, num_steps=4, batch_size=1, rank=1, seed=2, **token,
            )  # fmt: skip
            # A Generate while the job runs is served (it goes first between training steps).
            images = [e for e in client.generate("a red circle", seed=1, num_steps=3) if isinstance(e, Image)]
            assert len(images) == 1
            events = list(client.watch_job(job_id, timeout=300))
            assert events[-1].state == "succeeded", events[-1]
            class_images = sorted((data / "training" / "jobs" / job_id / "class_images").glob("class_*.png"))
            assert len(class_images) == 2
            assert "db" in [a.name for a in client.list_adapters()]
