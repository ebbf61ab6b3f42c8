"""OpenVINO engines against the torch engines: parity, PSNR, exact refit, static profiles, int8."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("openvino")

from engine_checks import check_components_close, check_refit_errors, check_refit_exact, check_refit_reaches_every_weight, end_to_end_psnr, unet_inputs
from impasto.backends.engine_folder import load_engine_folder
from tiny_sd_model import PROFILE_SIZE, engine_folder, tiny_model_dir


@pytest.fixture(scope="module")
def engines():
    return load_engine_folder(engine_folder("openvino"), tiny_model_dir())


def test_components_match_torch(engines):
    check_components_close(engines, atol=1e-4)


def test_end_to_end_psnr_at_least_40_db(engines):
    assert end_to_end_psnr(engines) >= 40


@pytest.mark.parametrize("refit_mode", ["parameters", "recompile"])
def test_refit_a_b_a_and_restore_are_exact(refit_mode):
    engines = load_engine_folder(engine_folder("openvino"), tiny_model_dir(), refit_mode=refit_mode)
    check_refit_exact(engines)


@pytest.mark.parametrize("refit_mode", ["parameters", "recompile"])
def test_refit_reaches_every_weight(refit_mode):
    engines = load_engine_folder(engine_folder("openvino"), tiny_model_dir(), refit_mode=refit_mode)
    check_refit_reaches_every_weight(engines)


def test_refit_rejects_unknown_names_and_wrong_shapes(engines):
    check_refit_errors(engines)


def test_static_profile_is_enforced(engines):
    info = engines.unet.info()
    assert (info.backend, info.precision, info.device) == ("openvino", "fp32", "cpu")
    assert info.profile.sizes == ((PROFILE_SIZE, PROFILE_SIZE),)
    assert engines.unet.accepts(2, PROFILE_SIZE, PROFILE_SIZE) and not engines.unet.accepts(3, PROFILE_SIZE, PROFILE_SIZE)
    assert not engines.unet.accepts(1, PROFILE_SIZE * 2, PROFILE_SIZE)
    too_big = unet_inputs()
    too_big["sample"] = torch.randn(2, 4, PROFILE_SIZE, PROFILE_SIZE // 2)
    with pytest.raises(ValueError, match="no compiled profile"):
        engines.unet.run(too_big)


def test_int8_weights_are_smaller_and_close():
    folder = engine_folder("openvino", "int8")
    fp32_bytes = (engine_folder("openvino") / "unet.onnx.data").stat().st_size
    assert (folder / "unet.bin").stat().st_size < 0.5 * fp32_bytes
    engines = load_engine_folder(folder, tiny_model_dir())
    assert end_to_end_psnr(engines) >= 20  # reported precisely by benchmarks/compiled_engines.py
