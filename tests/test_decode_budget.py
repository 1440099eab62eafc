"""The JPEG decode of folder/MJPEG frames through simplejpeg (libjpeg-turbo's TurboJPEG API) gives
the masks of today's OpenCV decode within the model's +-1 LSB noise floor, keeps the frame's
geometry (EXIF-rotated photos included), and falls back to OpenCV when simplejpeg is absent or
refuses the data. Its speed is measured by bench/perf.py (part ``decode``), never asserted here."""

from __future__ import annotations

import io

import cv2
import numpy as np
import pytest

from bench.perf import PHOTOS, crop_16_9
from edge_agent.daemon.pipeline import decode_hint
from edge_agent.inference import postprocess as post
from edge_agent.inference.segmenter import Segmenter
from edge_agent.sources import images
from edge_agent.sources.images import decode_rgb, jpeg_header
from tests.data import DM05, IMAGES, rgb

simplejpeg = pytest.importorskip("simplejpeg")  # a device dependency where PyPI has wheels


@pytest.fixture(scope="module")
def dm05():
    return Segmenter(str(DM05))


def jpeg_1080p(name: str) -> np.ndarray:
    """A photo of the test data as a 16:9 1920x1080 JPEG (quality 90), as the bench's folder."""
    img = crop_16_9(rgb(IMAGES / name))
    img = cv2.resize(img, (1920, 1080), interpolation=cv2.INTER_AREA if img.shape[1] > 1920 else cv2.INTER_CUBIC)
    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(img, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 90])
    assert ok
    return buf.reshape(-1)


def opencv_decode(data, hint=None):
    """Today's decode: OpenCV alone (simplejpeg hidden)."""
    saved = images.simplejpeg
    images.simplejpeg = None
    try:
        return decode_rgb(data, hint)
    finally:
        images.simplejpeg = saved


def test_simplejpeg_is_the_decoder_here(monkeypatch):
    assert images.JPEG_DECODER == "simplejpeg"
    calls = []

    class Counting:
        @staticmethod
        def decode_jpeg(data, **kw):
            calls.append(kw)
            return simplejpeg.decode_jpeg(data, **kw)

    monkeypatch.setattr(images, "simplejpeg", Counting)
    image, size = decode_rgb(np.fromfile(str(IMAGES / "cat_1080p.jpg"), np.uint8), lambda h, w: (289, 513))
    assert image.shape == (540, 960, 3) and size == (1080, 1920)
    assert calls == [{"colorspace": "RGB", "min_height": 540, "min_width": 960, "strict": True}]


def test_scaled_decode_masks_agree_with_todays_within_the_noise_floor(dm05):
    """The 1080p photos: the mask of the simplejpeg decode (1/2 of 1920x1080) against the mask of
    today's OpenCV decode differs in no more pixels than +-1 LSB of noise on today's frame moves
    that mask (the floor of docs/performance.md); here the decoded pixels are even identical."""
    hint = decode_hint(dm05)
    rng = np.random.default_rng(0)

    def mask(image, size):
        geometry = dm05.model.set_frame(image, dm05.mode, frame_hw=size)
        dm05.model.invoke()
        return post.to_frame(dm05.model.label_map(), geometry)

    diffs, floor = [], []
    for name in PHOTOS:
        data = jpeg_1080p(name)
        today, size_today = opencv_decode(data, hint)
        new, size_new = decode_rgb(data, hint)
        assert size_new == size_today == (1080, 1920)
        assert new.shape == today.shape == (540, 960, 3) and new.flags.c_contiguous
        assert np.abs(new.astype(np.int16) - today).max() <= 1, name  # same libjpeg-turbo IDCT
        reference = mask(today, size_today)
        got = mask(new, size_new)
        noisy = np.clip(today.astype(np.int16) + rng.integers(-1, 2, today.shape), 0, 255).astype(np.uint8)
        diffs.append((got != reference).mean())
        floor.append((mask(noisy, size_today) != reference).mean())
    assert np.mean(diffs) <= max(0.005, 1.5 * np.mean(floor)), (diffs, floor)
    assert max(diffs) < 0.05, diffs


def test_full_size_and_720p_decodes_equal_opencv():
    data = np.fromfile(str(IMAGES / "cat_720p.jpg"), np.uint8)
    full, size = decode_rgb(data)
    assert size == (720, 1280) and np.abs(full.astype(np.int16) - opencv_decode(data)[0]).max() <= 1
    half, size = decode_rgb(data, lambda h, w: (289, 513))
    assert half.shape == (360, 640, 3) and size == (720, 1280)
    assert np.abs(half.astype(np.int16) - opencv_decode(data, lambda h, w: (289, 513))[0]).max() <= 1


def exif_jpeg(orientation: int) -> np.ndarray:
    from PIL import Image

    image = Image.fromarray(cv2.resize(rgb(IMAGES / "cat_1080p.jpg"), (1920, 1080)))
    exif = Image.Exif()
    exif[0x0112] = orientation
    out = io.BytesIO()
    image.save(out, "JPEG", quality=90, exif=exif)
    return np.frombuffer(out.getvalue(), np.uint8)


def test_exif_rotated_photo_keeps_an_upright_image_of_its_own_size():
    """A phone photo with EXIF orientation 6 (rotate 90): OpenCV decodes it upright, so its size
    is the rotated one; a reduced decode of it would have been 960x540 rotated against a size of
    1080x1920 (a wrong geometry): it decodes at full size, upright, like the unhinted path."""
    pytest.importorskip("PIL")
    data = exif_jpeg(6)
    assert jpeg_header(data) == (1080, 1920, 6)
    image, size = decode_rgb(data, lambda h, w: (289, 513))
    assert image.shape == (1920, 1080, 3) and size == (1920, 1080)
    plain = exif_jpeg(1)
    assert jpeg_header(plain) == (1080, 1920, 1)
    image, size = decode_rgb(plain, lambda h, w: (289, 513))
    assert image.shape == (540, 960, 3) and size == (1080, 1920)


def test_truncated_or_foreign_data_gives_nothing_with_either_decoder():
    data = np.fromfile(str(IMAGES / "cat_1080p.jpg"), np.uint8)
    for broken in (data[: len(data) // 2], data[:5000], np.frombuffer(b"\xff\xd8 not a jpeg", np.uint8)):
        assert decode_rgb(broken, lambda h, w: (289, 513)) == (None, None)
        assert opencv_decode(broken, lambda h, w: (289, 513)) == (None, None)
    ok, png = cv2.imencode(".png", np.zeros((16, 24, 3), np.uint8))
    image, size = decode_rgb(png.reshape(-1), lambda h, w: (4, 4))
    assert image.shape == (16, 24, 3) and size == (16, 24)


def test_without_simplejpeg_opencv_decodes_reduced_as_before():
    data = np.fromfile(str(IMAGES / "cat_1080p.jpg"), np.uint8)
    image, size = opencv_decode(data, lambda h, w: (289, 513))
    assert image.shape == (540, 960, 3) and size == (1080, 1920)
