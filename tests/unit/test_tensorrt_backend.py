"""TensorRT engines: built refittable with optimisation profiles. Needs an NVIDIA GPU and tensorrt."""

from __future__ import annotations

import pytest

from impasto.backends.availability import backend_status

STATUS = backend_status("tensorrt")
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not STATUS.available, reason=STATUS.reason or "tensorrt unavailable")]


@pytest.fixture(scope="module")
def engines():
    from impasto.backends.engine_folder import load_engine_folder
    from tiny_sd_model import engine_folder, tiny_model_dir

    return load_engine_folder(engine_folder("tensorrt"), tiny_model_dir(), device="cuda")


def test_components_match_torch(engines):
    from engine_checks import check_components_close

    check_components_close(engines, atol=1e-3)  # TF32 and kernel choice differ from torch's CPU run


def test_end_to_end_psnr_at_least_40_db(engines):
    from engine_checks import end_to_end_psnr

    assert end_to_end_psnr(engines) >= 40


def test_refit_a_b_a_and_restore_are_exact(engines):
    from engine_checks import check_refit_exact

    check_refit_exact(engines)


def test_refit_rejects_unknown_names_and_wrong_shapes(engines):
    from engine_checks import check_refit_errors

    check_refit_errors(engines)


def test_refit_reaches_every_weight(engines):
    from engine_checks import check_refit_reaches_every_weight

    check_refit_reaches_every_weight(engines)
