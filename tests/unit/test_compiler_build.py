"""The compiler: profiles, atomic builds, reuse, the manifest and its refit map."""

from __future__ import annotations

import json
import stat

import pytest

pytest.importorskip("onnxruntime")

from impasto.backends.availability import backend_status
from impasto.backends.base import Component
from impasto.backends.manifest import Manifest, Profile
from impasto.backends.model_folder import cached_model_hash
from impasto.compiler import build as build_module
from impasto.compiler import onnxruntime_build
from impasto.compiler.build import BuildRequest, compile_model
from impasto.compiler.cli import main as cli_main
from impasto.compiler.profiles import parse_profile
from impasto.atomic_files import current_umask
from tiny_sd_model import PROFILE_SIZE, engine_folder, tiny_model_dir, torch_engines


def test_parse_profile():
    assert parse_profile("512x768:1-4") == Profile(512, 768, 1, 4)
    assert parse_profile("256x256:2") == Profile(256, 256, 2, 2)
    assert parse_profile("64x64") == Profile(64, 64, 1, 1)
    for bad in ("512x513:1-2", "512:1-2", "512x512:3-2", "512x512:0-1"):
        with pytest.raises(ValueError):
            parse_profile(bad)


def test_manifest_records_source_backend_precision_profiles_and_time():
    folder = engine_folder("onnxruntime")
    manifest = Manifest.read(folder)
    assert manifest.model_hash == cached_model_hash(tiny_model_dir()).sha256
    assert (manifest.backend, manifest.precision) == ("onnxruntime", "fp32")
    assert manifest.backend_version == backend_status("onnxruntime").version
    assert manifest.profiles == [Profile(PROFILE_SIZE, PROFILE_SIZE, 1, 2)]
    assert manifest.build_time and manifest.build_seconds > 0
    assert set(manifest.components) == {Component.TEXT_ENCODER, Component.UNET, Component.VAE_DECODER, Component.VAE_ENCODER}
    # mkdtemp's 0700 is not what a server running as another user could read
    assert stat.S_IMODE(folder.stat().st_mode) == 0o777 & ~current_umask()


def test_refit_map_names_every_torch_weight_with_its_layout():
    manifest = Manifest.read(engine_folder("onnxruntime"))
    unet_map = manifest.components[Component.UNET].refit
    torch_weights = torch_engines().unet.named_weights()
    assert set(unet_map) == set(torch_weights)
    to_q = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.weight"
    assert unet_map[to_q].layout == "transpose" and unet_map[to_q].shape == tuple(torch_weights[to_q].shape)
    assert unet_map["conv_in.weight"].layout == "same"
    text_map = manifest.components[Component.TEXT_ENCODER].refit
    assert set(text_map) == set(torch_engines().text_encoder.named_weights())
    assert any(name.endswith("token_embedding.weight") for name in text_map)  # textual inversion refits it
    # the decoder engine maps only the decoder's weights, the encoder only the encoder's
    decoder_map = manifest.components[Component.VAE_DECODER].refit
    assert all(name.startswith(("decoder.", "post_quant_conv.")) for name in decoder_map)


def test_rerun_with_same_inputs_reuses_the_folder():
    folder = engine_folder("onnxruntime")
    before = (folder / "manifest.json").stat().st_mtime_ns
    request = BuildRequest(tiny_model_dir(), "onnxruntime", folder.parent, "fp32", (Profile(PROFILE_SIZE, PROFILE_SIZE, 1, 2),))
    result = compile_model(request, log=lambda message: None)
    assert result.reused and result.folder == folder
    assert (folder / "manifest.json").stat().st_mtime_ns == before


def test_cli_prints_the_engine_folder(capsys):
    folder = engine_folder("onnxruntime")
    code = cli_main(["compile", str(tiny_model_dir()), "--backend", "onnxruntime",
                     "--profile", f"{PROFILE_SIZE}x{PROFILE_SIZE}:1-2", "--out", str(folder.parent)])
    assert code == 0 and capsys.readouterr().out.strip() == str(folder)


def test_a_failed_build_leaves_nothing_behind(tmp_path, monkeypatch):
    real = onnxruntime_build.build_component

    def fail_on_unet(component, *args):
        if component is Component.UNET:
            raise RuntimeError("simulated crash mid-build")
        return real(component, *args)

    monkeypatch.setattr(onnxruntime_build, "build_component", fail_on_unet)
    request = BuildRequest(tiny_model_dir(), "onnxruntime", tmp_path, "fp32", (Profile(PROFILE_SIZE, PROFILE_SIZE, 1, 1),),
                           components=(Component.TEXT_ENCODER, Component.UNET))
    with pytest.raises(RuntimeError, match="simulated crash"):
        compile_model(request, log=lambda message: None)
    assert list(tmp_path.iterdir()) == []


def test_folder_name_keys_every_input():
    base = dict(model_hash="a" * 64, backend="openvino", backend_version="1", precision="fp32",
                profiles=[Profile(64, 64, 1, 2)], components=build_module.ALL_COMPONENTS)
    name = build_module.folder_name(**base)
    for change in (dict(model_hash="b" * 64), dict(backend_version="2"), dict(precision="bf16"), dict(profiles=[Profile(64, 64, 1, 4)])):
        assert build_module.folder_name(**{**base, **change}) != name


def test_unknown_precision_and_unavailable_backend_are_refused(tmp_path):
    with pytest.raises(ValueError, match="onnxruntime builds"):
        compile_model(BuildRequest(tiny_model_dir(), "onnxruntime", tmp_path, "int8"))
    status = backend_status("tensorrt")
    if not status.available:
        with pytest.raises(RuntimeError, match="tensorrt"):
            compile_model(BuildRequest(tiny_model_dir(), "tensorrt", tmp_path))


def test_manifest_is_plain_json():
    data = json.loads((engine_folder("onnxruntime") / "manifest.json").read_text())
    entry = data["components"]["unet"]["refit"]["conv_in.weight"]
    assert entry == {"engine_name": "conv_in.weight", "shape": list(entry["shape"]), "layout": "same", "dtype": "float32"}


def test_static_shape_profile_never_claims_an_unbuilt_shape():
    from impasto.backends.manifest import shape_profile

    profiles = [Profile(256, 256, 1, 1), Profile(256, 256, 2, 2), Profile(512, 512, 2, 2)]
    static = shape_profile(profiles, dynamic=False)
    assert (static.min_batch, static.max_batch, static.sizes) == (1, 2, ((256, 256),))
    assert shape_profile(profiles, dynamic=True).sizes is None
