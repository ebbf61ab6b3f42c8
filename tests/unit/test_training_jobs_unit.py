"""The job system's pure parts: spec checks, dataset names, yielding to serving."""

from __future__ import annotations

import threading
from pathlib import Path
from types import SimpleNamespace

import pytest

from impasto.config import ServerConfig, TrainingConfig, load_config
from impasto.core.errors import InvalidArgument
from impasto.core.training_datasets import DatasetStore, check_dataset_name, check_file_path
from impasto.core.training_jobs import JobRecord, JobState, TrainingJobs
from impasto.core.training_methods import TrainingSpec, validate_spec


@pytest.mark.parametrize("name", ["..", "../x", "/abs", "a/b", "a\\..\\b", "C:\\x", "", "x/../y", "a..b/.."])
def test_dataset_names_are_plain_folder_names(name):
    with pytest.raises(InvalidArgument, match="dataset"):
        check_dataset_name(name)


def test_dataset_symlink_out_of_the_data_dir_is_refused(tmp_path):
    store = DatasetStore(tmp_path / "data", 1000)
    (tmp_path / "data" / "datasets").mkdir(parents=True)
    (tmp_path / "secret").mkdir()
    (tmp_path / "data" / "datasets" / "link").symlink_to(tmp_path / "secret")
    with pytest.raises(InvalidArgument, match="outside"):
        store.resolve("link")


@pytest.mark.parametrize("path", ["../a.png", "/a.png", "a/../../b.png", ".hidden", "a\\b.png", "a/b/c/d.png"])
def test_upload_file_paths(path):
    with pytest.raises(InvalidArgument, match="file.path"):
        check_file_path(path)
    assert str(check_file_path("images/0001.png")) == "images/0001.png"


@pytest.mark.parametrize(
    "spec, field",
    [
        (TrainingSpec("sgd", "d", "a"), "method"),
        (TrainingSpec("dreambooth_lora", "d", "a"), "instance_prompt"),
        (TrainingSpec("textual_inversion", "d", "a"), "textual_inversion.token"),
        (TrainingSpec("pivotal_tuning", "d", "a", token="<t>"), "initializer_token"),
        (TrainingSpec("lora", "d", "a", rank=1000), "lora.rank"),
        (TrainingSpec("lora", "d", "a", unet_lr=2.0), "unet_lr"),
        (TrainingSpec("pivotal_tuning", "d", "a", token="<t>", initializer_token="x", num_steps=10, embedding_steps=10), "embedding_steps"),
        (TrainingSpec("lora", "d", "a", train_lora_with_embedding=True), "textual_inversion.train_lora_with_embedding"),
        (TrainingSpec("dreambooth_lora", "d", "a", instance_prompt="a sks shape", extra_class_prompts=("x",) * 1025), "dreambooth.extra_class_prompts: at most 1024"),
        (TrainingSpec("dreambooth_lora", "d", "a", instance_prompt="a sks shape", num_class_images=10_001), "dreambooth.num_class_images: at most"),
    ],
)
def test_spec_errors_name_the_field(spec, field):
    with pytest.raises(InvalidArgument, match=field):
        validate_spec(spec)


def test_class_prompts_are_counted_as_the_trainer_counts_them():
    """A repeat of the class prompt (spaces aside) is one prompt, as in dreambooth.class_prompts:
    two images cover "a shape" and "a circle", so the spec passes; one does not."""
    spec = dict(instance_prompt="a sks shape", class_prompt="a shape", extra_class_prompts=("a  shape", "a circle"))
    validate_spec(TrainingSpec("dreambooth_lora", "d", "a", num_class_images=2, **spec))
    with pytest.raises(InvalidArgument, match="1 is fewer than the 2 class prompts"):
        validate_spec(TrainingSpec("dreambooth_lora", "d", "a", num_class_images=1, **spec))


def test_records_round_trip_through_json():
    spec = TrainingSpec("dreambooth_lora", "d", "a", sample_prompts=("x",), alpha=2.0, extra_class_prompts=("a red circle",), text_prior_prompts=("y",))
    job = JobRecord("j1", spec, state=JobState.RUNNING, outputs={"kohya": "a.safetensors"})
    assert JobRecord.from_json(job.to_json()) == job


def test_training_config_section(tmp_path):
    path = tmp_path / "impasto.toml"
    path.write_text(f'[server]\ndata_dir = "{tmp_path}"\n[training]\ncheckpoint_every = 7\n')
    config = load_config(path)
    assert config.training.checkpoint_every == 7 and config.resolved_data_dir == tmp_path
    assert config.resolved_adapters_dir == tmp_path / "adapters"
    with pytest.raises(ValueError, match="training.max_running_jobs"):
        load_config(None, max_running_jobs=0)


def test_a_step_waits_while_the_step_loop_has_work():
    busy = threading.Event()
    busy.set()
    engine = SimpleNamespace(step_loop=SimpleNamespace(scheduler=SimpleNamespace(has_work=busy.is_set)))
    config = ServerConfig(training=TrainingConfig(max_yield_wait_s=5.0))
    jobs = TrainingJobs(config, engine)
    job = JobRecord("j", TrainingSpec("lora", "d", "a"))
    threading.Timer(0.2, busy.clear).start()
    jobs._yield_to_serving(job)
    assert not busy.is_set()  # it returned only once serving was idle

    # A job is never starved: past max_yield_wait_s it takes one step anyway.
    busy.set()
    jobs.config = TrainingConfig(max_yield_wait_s=0.05)
    jobs._yield_to_serving(job)
    assert busy.is_set()


def test_a_restart_drops_the_temp_files_of_writes_a_crash_cut_short(tmp_path):
    from impasto.core.training_jobs import _remove_partial_writes

    kept = ["job.json", "checkpoint.pt", "outputs/a.safetensors", "class_images/class_00000.png"]
    partial = [
        ".job.json.x1.tmp", ".checkpoint.x2.tmp", "outputs/.a.safetensors.x3.tmp",
        "class_images/.class_00001.png.tmp", "outputs/.a.peft_unet.x4.tmp/adapter_config.json",
    ]  # fmt: skip
    for name in kept + partial:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    _remove_partial_writes(tmp_path)
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file()) == sorted(kept)
    assert not (tmp_path / "outputs" / ".a.peft_unet.x4.tmp").exists()


def test_the_peft_export_writes_in_a_temp_folder_the_restart_removes(tmp_path, monkeypatch):
    """A kill -9 mid-export leaves the zip's working folder behind: it must carry the name
    `_remove_partial_writes` looks for, as every other partial write does."""
    import tempfile

    import torch

    from impasto.lora import CanonicalAdapter, LoraModule
    from impasto.training import outputs

    made = []

    class Recording(tempfile.TemporaryDirectory):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made.append(self.name)

    monkeypatch.setattr(outputs.tempfile, "TemporaryDirectory", Recording)
    module = LoraModule(down=torch.ones(1, 4), up=torch.ones(4, 1), alpha=1.0)
    adapter = CanonicalAdapter(modules={"unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q": module})
    files = outputs.write_outputs(adapter, tmp_path, "a")
    assert "peft_unet" in files and made and all(Path(name).parent == tmp_path for name in made)
    # As a kill -9 mid-export would leave them: the restart's clean-up removes them, outputs stay.
    from impasto.core.training_jobs import _remove_partial_writes

    for name in made:
        Path(name).mkdir()
        (Path(name) / "adapter_model.safetensors").write_bytes(b"x")
    _remove_partial_writes(tmp_path)
    assert not any(Path(name).exists() for name in made)
    assert all(path.exists() for path in files.values())



def test_a_watcher_that_subscribes_during_a_state_change_sees_it_once(tmp_path, monkeypatch):
    """A watcher's snapshot and the change's event must not both carry one change. Here a
    watcher subscribes after the change is made, while its event is being built: it sees RUNNING
    in its snapshot, and the event goes only to the watchers there were when the change was
    made (the subscriber list is read under the lock that made it)."""
    import asyncio

    from impasto.core import training_jobs

    jobs = TrainingJobs(ServerConfig(data_dir=tmp_path), SimpleNamespace())
    job = JobRecord("j", TrainingSpec("lora", "d", "a"))
    jobs._jobs["j"] = job
    events: list = []

    async def collect():
        stream = jobs.watch("j")
        try:
            while True:  # until the stream has been quiet for half a second
                events.append(await asyncio.wait_for(stream.__anext__(), 0.5))
        except asyncio.TimeoutError:
            pass

    watcher = threading.Thread(target=lambda: asyncio.run(collect()), daemon=True)
    changer = threading.current_thread()

    class StatusBuiltWhileAWatcherSubscribes(training_jobs.JobStatus):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            if threading.current_thread() is changer and not watcher.is_alive():
                watcher.start()
                threading.Event().wait(0.3)  # the watcher has subscribed by now

    monkeypatch.setattr(training_jobs, "JobStatus", StatusBuiltWhileAWatcherSubscribes)
    jobs._set_state(job, JobState.RUNNING)
    watcher.join(10)
    states = [e.job.state for e in events if isinstance(e, training_jobs.JobStatus)]
    assert states == [JobState.RUNNING], states
