"""The fast paths are correct: output views, argmax, fast resize, tuned PNG, no aliasing.

Speed itself is measured by bench/perf.py, never asserted here.
"""

from __future__ import annotations

import glob
import os

import cv2
import numpy as np
import pytest

from edge_agent.output import encode as publish
from edge_agent.inference.model import SegmentationModel
from edge_agent.inference.postprocess import argmax_channels
from edge_agent.output import stages
from edge_agent.inference.preprocess import AREA, FAST, letterbox, letterbox_geometry, resize_into, shrink_into
from edge_agent.inference.segmenter import Segmenter
from edge_agent.sources.base import Frame
from tests.data import BIRD, DM05, FLOAT_257, IMAGES, VOC, bird_mask, rgb
from tests.helpers import ListSink


@pytest.fixture(scope="module")
def dm05():
    return Segmenter(str(DM05))


@pytest.fixture(scope="module")
def golden_pairs():
    """The golden bird and the VOC val images with their ground-truth class masks."""
    pairs = [(rgb(BIRD), bird_mask())]
    for path in sorted(glob.glob(str(VOC / "JPEGImages" / "*.png"))):
        gt = cv2.imread(str(VOC / "SegmentationClass" / os.path.basename(path)), cv2.IMREAD_UNCHANGED)
        pairs.append((rgb(path), gt if gt.ndim == 2 else gt[..., 0]))
    assert len(pairs) >= 8
    return pairs


# -- output tensor read through a view -------------------------------------------------------------

@pytest.mark.parametrize("path", [DM05, FLOAT_257], ids=["argmax-in-graph", "float-logits"])
def test_label_map_from_view_equals_get_tensor_path(path):
    model = SegmentationModel(str(path))
    model.set_frame(rgb(IMAGES / "cat_720p.jpg"))
    model.invoke()
    raw = model.raw_output()[0]  # the old path: a get_tensor copy
    expected = raw.astype(np.uint8) if model.output.kind == "labels" else np.argmax(raw, -1).astype(np.uint8)
    got = model.label_map()
    assert got.dtype == np.uint8 and got.shape == expected.shape
    np.testing.assert_array_equal(got, expected)


def test_label_map_is_a_new_array_each_frame():
    model = SegmentationModel(str(DM05))
    model.set_frame(rgb(IMAGES / "cat_720p.jpg"))
    model.invoke()
    first = model.label_map()
    kept = first.copy()
    model.set_frame(rgb(BIRD))
    model.invoke()  # would raise if a view of the output were still alive
    second = model.label_map()
    np.testing.assert_array_equal(first, kept)  # the next frame did not overwrite it
    assert not np.shares_memory(first, second)
    assert not np.array_equal(first, second)


# -- argmax ------------------------------------------------------------------------------------------

def _planted_logits(dtype, shape=(33, 47, 21), seed=7):
    """Logits whose argmax is known by construction: (logits, expected uint8 class ids).

    Every pixel gets 1-3 "winner" channels set to the dtype's top value; all other channels lie
    strictly below it. The expected class is the lowest winner (the first maximum wins a tie).
    """
    rng = np.random.default_rng(seed)
    h, w, c = shape
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        top = info.max
        x = rng.integers(info.min, top - 1, shape, endpoint=True).astype(dtype)
    else:
        top = 100.0
        x = np.clip(rng.standard_normal(shape), -50, 50).astype(dtype)
    expected = np.empty((h, w), np.uint8)
    for i in range(h):
        for j in range(w):
            winners = rng.choice(c, size=int(rng.integers(1, 4)), replace=False)
            x[i, j, winners] = top
            expected[i, j] = min(winners)
    return x, expected


@pytest.mark.parametrize("dtype", [np.float32, np.float16, np.uint8, np.int8])
def test_argmax_channels_finds_the_planted_class_and_first_of_ties(dtype):
    x, expected = _planted_logits(dtype)
    assert (x == x.max(-1, keepdims=True)).sum(-1).max() > 1  # ties are really there
    got = argmax_channels(x)
    assert got.dtype == np.uint8 and got.shape == expected.shape
    np.testing.assert_array_equal(got, expected)


def test_argmax_channels_nan_and_class_limit():
    x = np.zeros((4, 4, 3), np.float32)
    x[1, 1, 2] = np.nan  # NaN counts as the maximum (numpy's rule), never as a silent class 0
    x[2, 2, 1] = 5
    expected = np.zeros((4, 4), np.uint8)  # all-equal pixels: the first class wins
    expected[1, 1], expected[2, 2] = 2, 1
    np.testing.assert_array_equal(argmax_channels(x), expected)
    widest = np.zeros((2, 2, 256), np.float32)
    widest[..., 255] = 1
    assert (argmax_channels(widest) == 255).all()  # 256 classes still fit in a uint8 mask
    with pytest.raises(ValueError, match="257 classes"):
        argmax_channels(np.zeros((2, 2, 257), np.float32))


# -- fast resize -------------------------------------------------------------------------------------

def test_fast_resize_is_halving_then_linear_written_in_place():
    frame = cv2.resize(rgb(IMAGES / "cat_1080p.jpg"), (1080, 1920))  # portrait: region is row-strided
    canvas = np.zeros((513, 513, 3), np.uint8)
    g = letterbox_geometry(1920, 1080, 513, 513)
    resize_into(frame, canvas, g, 128, FAST)
    half = cv2.resize(frame, (540, 960), interpolation=cv2.INTER_AREA)
    expected = cv2.resize(half, (g.scaled_w, g.scaled_h), interpolation=cv2.INTER_LINEAR)
    np.testing.assert_array_equal(canvas[:, :g.scaled_w], expected)
    assert (canvas[:, g.scaled_w:] == 128).all()


def test_area_quality_is_plain_inter_area_and_unknown_quality_refused():
    frame = rgb(IMAGES / "cat_1080p.jpg")
    canvas, g = letterbox(frame, (513, 513), quality=AREA)
    expected = cv2.resize(frame, (g.scaled_w, g.scaled_h), interpolation=cv2.INTER_AREA)
    np.testing.assert_array_equal(canvas[:g.scaled_h], expected)
    with pytest.raises(ValueError, match="resize quality"):
        letterbox(frame, (513, 513), quality="bicubic")


def test_upscale_and_small_frames_take_the_exact_path():
    small = rgb(IMAGES / "cat_720p.jpg")[:240, :320].copy()
    dst = np.empty((385, 513, 3), np.uint8)
    shrink_into(small, dst, FAST)
    np.testing.assert_array_equal(dst, cv2.resize(small, (513, 385), interpolation=cv2.INTER_LINEAR))


@pytest.mark.parametrize("hw", [(480, 640), (720, 1280), (1080, 1920)])
def test_fast_resize_masks_agree_with_inter_area_within_half_a_percent(hw, dm05, golden_pairs):
    """On golden/VOC images (scaled to camera sizes) the masks differ in < 0.5% of pixels on
    average, and accuracy against the ground truth moves by < 0.5 percentage points."""
    h, w = hw
    equal, acc_area, acc_fast = [], [], []
    for image, gt in golden_pairs:
        frame = cv2.resize(image, (w, h), interpolation=cv2.INTER_CUBIC)
        masks = {}
        for quality in (AREA, FAST):
            geometry = dm05.model.set_frame(frame, quality=quality)
            dm05.model.invoke()
            masks[quality] = dm05.model.label_map()[:geometry.scaled_h, :geometry.scaled_w]
        equal.append(np.mean(masks[AREA] == masks[FAST]))
        valid = gt != 255
        for quality, acc in ((AREA, acc_area), (FAST, acc_fast)):
            full = cv2.resize(masks[quality], gt.shape[::-1], interpolation=cv2.INTER_NEAREST)
            acc.append(np.mean(full[valid] == gt[valid]))
    assert np.mean(equal) >= 0.995, equal
    assert min(equal) >= 0.98, equal
    assert abs(np.mean(acc_fast) - np.mean(acc_area)) < 0.005


# -- PNG -----------------------------------------------------------------------------------------------

def test_tuned_png_is_lossless_and_smaller_than_opencv_default(dm05):
    mask = np.ascontiguousarray(dm05.segment(rgb(IMAGES / "cat_1080p.jpg"), full_mask=False).model_mask)
    noise = np.random.default_rng(3).integers(0, 21, (97, 131), dtype=np.uint8)
    for m in (mask, noise):
        for level in range(10):
            np.testing.assert_array_equal(publish.decode_mask_png(publish.encode_mask_png(m, level)), m)
    default = cv2.imencode(".png", mask, publish.png_params(1, tuned=False))[1]
    assert len(publish.encode_mask_png(mask, 1)) < len(default)


# -- the pipeline's per-frame path ---------------------------------------------------------------------

def test_process_frame_buffers_do_not_alias_across_frames(dm05):
    sink = ListSink()
    a, _ = stages.prepare(dm05.model, rgb(IMAGES / "cat_720p.jpg"), dm05.mode)
    b, _ = stages.prepare(dm05.model, rgb(BIRD), dm05.mode)
    assert not np.shares_memory(a, b)
    output = stages.FrameOutput()
    timings = stages.run_frame(dm05, Frame(rgb(BIRD), 3, 0.0, 0.0, "t"), output, sink)
    stages.run_frame(dm05, Frame(rgb(IMAGES / "cat_720p.jpg"), 4, 0.0, 0.0, "t"), output, sink)
    assert list(timings) == ["preprocess", "inference", "postprocess", "encode", "publish", "end_to_end"]
    masks = [publish.decode_mask_png(p) for s, p in sink.messages if s == "mask"]
    assert len(masks) == 2 and masks[0].shape == (513, 513) and masks[1].shape == (289, 513)
    assert (masks[0] == 3).mean() > 0.05  # the bird frame's mask is the bird's, not the cat's


# -- near-fit frames and class counts ------------------------------------------------------------------

def test_picamera2_lores_frame_is_padded_not_resampled():
    """512x288 (the lores size picamera2 picks for a 513x513 model) lands in the input unchanged."""
    frame = rgb(IMAGES / "cat_720p.jpg")[:288, :512].copy()
    canvas, g = letterbox(frame, (513, 513))
    assert (g.scaled_h, g.scaled_w) == (288, 512) and not g.resized
    np.testing.assert_array_equal(canvas[:288, :512], frame)
    assert (canvas[288:] == 128).all() and (canvas[:, 512:] == 128).all()
    assert (letterbox_geometry(240, 320, 513, 513).scaled_h, letterbox_geometry(240, 320, 513, 513).scaled_w) == (385, 513)


def test_class_counts_equal_bincount():
    from edge_agent.inference.postprocess import class_counts

    rng = np.random.default_rng(5)
    masks = [np.zeros((3, 3), np.uint8), np.full((4, 4), 255, np.uint8),
             rng.integers(0, 21, (289, 513), dtype=np.uint8),
             rng.integers(0, 21, (40, 60), dtype=np.uint8)[:, ::2]]  # non-contiguous view
    for m in masks:
        expected = np.bincount(m.ravel(), minlength=1)
        got = class_counts(m)
        assert got.dtype == expected.dtype
        np.testing.assert_array_equal(got, expected)
