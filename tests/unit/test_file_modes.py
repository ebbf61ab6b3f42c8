"""What our atomic writes leave behind has the mode a plain open/mkdir gives, not mkstemp's 0600.

A dataset prepared by one user, or an adapter downloaded in a container, must stay readable by
the server that runs as another."""

from __future__ import annotations

import os
import stat

import pytest
import torch
from PIL import Image

from impasto.cli_output import write_file
from impasto.lora.files import atomic_directory, write_json, write_safetensors
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
