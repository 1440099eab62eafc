"""Shared fixtures for the host-tool tests: real models/images from ../shared/test_data."""

from __future__ import annotations

import pytest

from tests.host.host_data import CALIB_COUNT, DM05_QUANT, IMAGES


@pytest.fixture(scope="session")
def dm05_rebuilt():
    """Coral's dm05 uint8 model rebuilt to float (logits head)."""
    from tools.host.rebuild import rebuild

    return rebuild(DM05_QUANT, argmax=False)


@pytest.fixture(scope="session")
def calib_images():
    """Calibration on the shared natural photos (not the VOC evaluation pairs)."""
    from tools.host.datasets import calibration_images

    return calibration_images(IMAGES, CALIB_COUNT)


@pytest.fixture(scope="session")
def dm05_ptq(dm05_rebuilt, calib_images, tmp_path_factory):
    """Our uint8 PTQ of the rebuilt dm05 float with the ptq defaults (129x129 ArgMax head)."""
    from tools.host.ptq import PTQOptions, quantize_keras, write_tflite

    data = quantize_keras(dm05_rebuilt[0], PTQOptions(argmax=True), calib_images)
    return write_tflite(data, tmp_path_factory.mktemp("ptq") / "dm05_ptq_uint8.tflite")
