"""Finding and loading engine folders: a manifest that does not match is refused with a reason."""

from __future__ import annotations

import json
import shutil

import pytest

pytest.importorskip("onnxruntime")

from impasto.backends.engine_folder import ManifestMismatch, find_engine_folders, load_engine_folder
from impasto.backends.model_folder import cached_model_hash
from tiny_sd_model import engine_folder, tiny_model_dir


@pytest.fixture
def folder_copy(tmp_path):
    copy = tmp_path / "engines" / "copy"
    shutil.copytree(engine_folder("onnxruntime"), copy)
    return copy


def _edit_manifest(folder, **changes):
    path = folder / "manifest.json"
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def test_wrong_model_hash_is_refused(folder_copy):
    _edit_manifest(folder_copy, model_hash="0" * 64)
    with pytest.raises(ManifestMismatch, match="built from model 0000000000"):
        load_engine_folder(folder_copy, tiny_model_dir())


def test_wrong_backend_version_is_refused(folder_copy):
    _edit_manifest(folder_copy, backend_version="0.0.1")
    with pytest.raises(ManifestMismatch, match="built with onnxruntime 0.0.1, installed is"):
        load_engine_folder(folder_copy, tiny_model_dir())


def test_missing_engine_file_is_refused(folder_copy):
    (folder_copy / "unet.onnx.data").unlink()
    with pytest.raises(ManifestMismatch, match="missing file unet.onnx.data"):
        load_engine_folder(folder_copy, tiny_model_dir())


def test_find_engine_folders_by_model_hash(folder_copy):
    engines_dir = folder_copy.parent
    (engines_dir / ".half-built.tmp").mkdir()  # an interrupted build is never listed
    model_hash = cached_model_hash(tiny_model_dir()).sha256
    assert find_engine_folders(engines_dir, model_hash) == [("onnxruntime", folder_copy)]
    assert find_engine_folders(engines_dir, "f" * 64) == []
    assert find_engine_folders(engines_dir / "nowhere", model_hash) == []


def test_loaded_engines_say_what_they_are(folder_copy):
    engines = load_engine_folder(folder_copy, tiny_model_dir())
    infos = [engine.info() for engine in engines.all()]
    assert [i.component.value for i in infos] == ["text_encoder", "unet", "vae_decoder", "vae_encoder"]
    assert {(i.backend, i.precision, i.device) for i in infos} == {("onnxruntime", "fp32", "cpu")}
