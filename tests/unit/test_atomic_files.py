"""Atomic writes: whole or not at all, and with the mode a plain open/mkdir gives (not mkstemp's
0600), so a dataset prepared by one user stays readable by a server that runs as another."""

from __future__ import annotations

import os
import stat

import pytest
import torch
from PIL import Image

from impasto.atomic_files import atomic_directory, write_file
from impasto.lora.files import write_json, write_safetensors
from impasto.training.prep import PrepConfig, prepare


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_written_files_are_0644_under_umask_022(tmp_path, umask_022):
    assert mode(write_file(tmp_path / "image.png", b"png")) == 0o644
    assert mode(write_safetensors(tmp_path / "a.safetensors", {"w": torch.zeros(2)})) == 0o644
    assert mode(write_json(tmp_path / "a.json", {"a": 1})) == 0o644


def test_atomic_folders_are_0755_under_umask_022(tmp_path, umask_022):
    with atomic_directory(tmp_path / "fused") as folder:
        (folder / "x.txt").write_text("x")
    assert mode(tmp_path / "fused") == 0o755

    (tmp_path / "raw").mkdir()
    Image.new("RGB", (64, 64), "red").save(tmp_path / "raw" / "a.png")
    prepare(PrepConfig(source=str(tmp_path / "raw"), out=str(tmp_path / "prepped"), size=64, caption="template", template="a {token}", token="sks"))
    assert mode(tmp_path / "prepped") == 0o755


def test_a_stricter_umask_is_kept(tmp_path):
    old = os.umask(0o077)
    try:
        assert mode(write_file(tmp_path / "private.png", b"png")) == 0o600
    finally:
        os.umask(old)


def test_write_file_replaces_whole_and_leaves_no_temporary(tmp_path):
    path = write_file(tmp_path / "sub" / "a.png", b"new")
    assert path.read_bytes() == b"new"
    assert os.listdir(tmp_path / "sub") == ["a.png"]


def test_write_file_that_fails_keeps_the_old_file(tmp_path):
    (tmp_path / "a.png").write_bytes(b"old")

    class Unwritable:  # fails inside the write, after the temporary file exists
        def __len__(self):
            return 3

    with pytest.raises(TypeError):
        write_file(tmp_path / "a.png", Unwritable())
    assert (tmp_path / "a.png").read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["a.png"]


def test_prep_overwrite_swaps_the_dataset_in_one_step(tmp_path):
    (tmp_path / "raw").mkdir()
    Image.new("RGB", (64, 64), "red").save(tmp_path / "raw" / "a.png")
    cfg = PrepConfig(source=str(tmp_path / "raw"), out=str(tmp_path / "prepped"), size=64, caption="template", template="a {token}", token="sks")
    prepare(cfg)
    Image.new("RGB", (64, 64), "blue").save(tmp_path / "raw" / "b.png")
    with pytest.raises(FileExistsError):
        prepare(cfg)
    prepare(PrepConfig(**{**cfg.__dict__, "overwrite": True}))
    assert len(list((tmp_path / "prepped" / "images").iterdir())) == 2
    assert sorted(os.listdir(tmp_path)) == ["prepped", "raw"], "no temporary or old folder left behind"
