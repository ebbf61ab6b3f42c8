"""Backpressure and model discovery, each on a server configured for the case."""

from __future__ import annotations

import shutil

import pytest

from impasto.models import default_model_path
from impasto_client import Image, ImpastoClient, QueueFullError, UnavailableError, Started

from conftest import running_server


def test_full_queue_answers_resource_exhausted_at_once():
    with running_server(max_batch_size=1, max_running_images=1, max_queue_length=1) as server, ImpastoClient(server.target) as client:
        busy = client.generate("a circle", num_steps=150, seed=1)
        assert any(isinstance(e, Started) for e in _until_started(busy))  # running, not waiting
        waiting = client.generate("a square", num_steps=2, seed=2)
        next(waiting)  # queued: the one waiting place is taken
        with pytest.raises(QueueFullError) as info:
            list(client.generate("a triangle", num_steps=2, seed=3))
        assert "1 of 1" in info.value.message
        busy.close()
        assert any(isinstance(e, Image) for e in waiting)


def _until_started(stream):
    for event in stream:
        yield event
        if isinstance(event, Started):
            return


def test_models_dir_lists_models_and_refuses_pickles(tmp_path):
    models = tmp_path / "models"
    shutil.copytree(default_model_path(), models / "shapes-copy")
    pickled = models / "pickled"
    shutil.copytree(default_model_path(), pickled)
    for f in pickled.rglob("*.safetensors"):
        f.rename(f.with_name(f.stem + ".bin"))
    (models / "not-a-model").mkdir()
    with running_server(models_dir=models, include_embedded_model=False) as server, ImpastoClient(server.target) as client:
        listed = {m.name: m for m in client.list_models()}
        assert listed["shapes-copy"].available and listed["shapes-copy"].is_default
        assert not listed["pickled"].available and "pickle" in listed["pickled"].unavailable_reason
        assert not listed["not-a-model"].available and "model_index.json" in listed["not-a-model"].unavailable_reason
        with pytest.raises(UnavailableError) as info:
            list(client.generate("a circle", model="pickled"))
        assert "pickle" in info.value.message
        # the copy of the default has the same bytes, so the same hash, and it can be named by hash
        by_hash = list(client.generate("a circle", model=listed["shapes-copy"].hash, num_steps=2, seed=1))
        assert any(isinstance(e, Image) for e in by_hash)
