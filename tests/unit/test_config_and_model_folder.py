"""Config loading and validation; model folder checks and the documented model hash."""

from __future__ import annotations

import hashlib

import pytest

from impasto.backends.model_folder import UnsafeModelError, check_loadable, hash_model_folder
from impasto.config import load_config


def test_toml_then_flags(tmp_path):
    path = tmp_path / "impasto.toml"
    path.write_text('[server]\nport = 6000\n[limits]\nmax_steps = 40\n[scheduler]\nmax_batch_size = 2\n')
    config = load_config(path, port=None, max_steps=30)
    assert config.port == 6000 and config.limits.max_steps == 30 and config.scheduler.max_batch_size == 2


@pytest.mark.parametrize(
    "text, message",
    [
        ("[limits]\nmax_stepz = 3\n", "max_stepz"),
        ("[limits]\nmax_steps = 0\n", "limits.max_steps"),
        ("[scheduler]\nmax_batch_size = 0\n", "max_batch_size"),
        ("[servr]\n", "servr"),
    ],
)
def test_bad_config_is_refused_by_name(tmp_path, text, message):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ValueError, match=message):
        load_config(path)


def make_folder(root, suffix=".safetensors"):
    root.mkdir(parents=True)
    (root / "model_index.json").write_text("{}")
    for part in ("unet", "vae", "text_encoder"):
        (root / part).mkdir(parents=True)
        (root / part / f"weights{suffix}").write_bytes(part.encode() * 10)
    return root


def test_hash_is_sha256_over_the_documented_byte_sequence(tmp_path):
    folder = make_folder(tmp_path / "m")
    expected = hashlib.sha256()
    for part in ("text_encoder", "unet", "vae"):  # sorted relative paths
        expected.update(f"{part}/weights.safetensors".encode() + b"\0" + part.encode() * 10)
    h = hash_model_folder(folder)
    assert h.sha256 == expected.hexdigest() and h.short == expected.hexdigest()[:10]
    (folder / "model_index.json").write_text('{"changed": 1}')  # configs do not count
    assert hash_model_folder(folder) == h


def test_pickles_are_refused_with_a_reason(tmp_path):
    folder = make_folder(tmp_path / "p", suffix=".bin")
    with pytest.raises(UnsafeModelError, match="pickle"):
        check_loadable(folder)
    check_loadable(make_folder(tmp_path / "ok"))
