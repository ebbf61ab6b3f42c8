"""ONNX Runtime engines against the torch engines: parity, end-to-end PSNR, exact refit."""

from __future__ import annotations

import pytest

pytest.importorskip("onnxruntime")

from engine_checks import check_components_close, check_refit_errors, check_refit_exact, check_refit_reaches_every_weight, end_to_end_psnr
from impasto.backends.engine_folder import load_engine_folder
from tiny_sd_model import engine_folder, tiny_model_dir


@pytest.fixture(scope="module")
def engines():
    return load_engine_folder(engine_folder("onnxruntime"), tiny_model_dir())


def test_components_match_torch(engines):
    check_components_close(engines, atol=1e-4)


def test_end_to_end_psnr_at_least_40_db(engines):
    assert end_to_end_psnr(engines) >= 40


@pytest.mark.parametrize("refit_mode", ["override", "inputs"])
def test_refit_a_b_a_and_restore_are_exact(refit_mode):
    engines = load_engine_folder(engine_folder("onnxruntime"), tiny_model_dir(), refit_mode=refit_mode)
    check_refit_exact(engines)


@pytest.mark.parametrize("refit_mode", ["override", "inputs"])
def test_refit_reaches_every_weight(refit_mode):
    engines = load_engine_folder(engine_folder("onnxruntime"), tiny_model_dir(), refit_mode=refit_mode)
    check_refit_reaches_every_weight(engines)


def test_refit_rejects_unknown_names_and_wrong_shapes(engines):
    check_refit_errors(engines)


def test_info_describes_a_dynamic_cpu_engine(engines):
    info = engines.unet.info()
    assert (info.backend, info.precision, info.device) == ("onnxruntime", "fp32", "cpu")
    assert info.profile.sizes is None and engines.unet.accepts(3, 96, 64)
