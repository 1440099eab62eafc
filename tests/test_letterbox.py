"""Letterbox geometry: exact sizes, padding never leaks into the mask, no needless resize."""

from __future__ import annotations

import numpy as np
import pytest

from edge_agent.inference import postprocess
from edge_agent.inference.preprocess import letterbox, letterbox_geometry
from edge_agent.inference.segmenter import Segmenter
from tests.data import DM05, FLOAT_257, IMAGES, bird_513, rgb


def fed(model) -> np.ndarray:
    """The input tensor as the interpreter holds it, read through its public get_tensor (a copy)."""
    return model.loaded.interpreter.get_tensor(model.input.index)[0]


@pytest.mark.parametrize(
    "frame_hw,input_hw,scaled_hw",
    [
        ((720, 1280), (513, 513), (289, 513)),
        ((1280, 720), (513, 513), (513, 289)),
        ((1080, 1920), (513, 513), (289, 513)),
        ((480, 640), (513, 513), (385, 513)),
        ((513, 513), (513, 513), (513, 513)),
        ((100, 50), (257, 257), (257, 128)),  # upscaling keeps the ratio too
        ((720, 1280), (240, 320), (180, 320)),  # non-square input
        ((1, 1000), (513, 513), (1, 513)),  # extreme ratio never gives an empty side
    ],
)
def test_geometry(frame_hw, input_hw, scaled_hw):
    g = letterbox_geometry(*frame_hw, *input_hw)
    assert (g.scaled_h, g.scaled_w) == scaled_hw
    assert g.scaled_h <= g.input_h and g.scaled_w <= g.input_w


def test_letterbox_pads_bottom_right_with_the_zero_point():
    frame = np.full((720, 1280, 3), 7, np.uint8)
    canvas, g = letterbox(frame, (513, 513), pad_value=128)
    assert canvas.shape == (513, 513, 3)
    assert (canvas[: g.scaled_h, : g.scaled_w] == 7).all()
    assert (canvas[g.scaled_h:, :] == 128).all()


def test_frame_at_model_size_is_copied_not_resized():
    frame = rgb(IMAGES / "checker513X513.bmp")
    canvas, g = letterbox(frame, (513, 513))
    assert not g.resized and not g.padded
    assert np.array_equal(canvas, frame)


def test_stretch_mode_fills_the_input():
    frame = np.zeros((720, 1280, 3), np.uint8)
    _, g = letterbox(frame, (513, 513), mode="stretch")
    assert (g.scaled_h, g.scaled_w) == (513, 513) and not g.padded


def test_unknown_mode_is_refused():
    with pytest.raises(ValueError, match="unknown preprocess mode"):
        letterbox(np.zeros((4, 4, 3), np.uint8), (8, 8), mode="zoom")


def test_padding_never_leaks_into_the_mask():
    g = letterbox_geometry(720, 1280, 513, 513)
    label_map = np.full((513, 513), 99, np.uint8)  # 99 marks the padding
    label_map[: g.scaled_h, : g.scaled_w] = 3
    mask = postprocess.to_frame(label_map, g)
    assert mask.shape == (720, 1280)
    assert set(np.unique(mask)) == {3}


def test_smaller_outputs_scale_the_valid_region():
    """A model whose output is at a lower resolution (e.g. output stride 8 without upsampling)."""
    g = letterbox_geometry(720, 1280, 513, 513)
    assert g.valid_region(65, 65) == (37, 65)
    label_map = np.full((65, 65), 99, np.uint8)
    label_map[:37, :] = 5
    assert set(np.unique(postprocess.to_frame(label_map, g))) == {5}


def test_nearest_neighbour_never_invents_class_ids():
    label_map = np.zeros((10, 10), np.uint8)
    label_map[:, 5:] = 20
    out = postprocess.resize_labels(label_map, 37, 91)
    assert set(np.unique(out)) == {0, 20}


@pytest.fixture(scope="module")
def dm05():
    return Segmenter(str(DM05))


@pytest.mark.parametrize("shape", [(720, 1280), (1280, 720)])
def test_real_frames_give_masks_of_the_frame_size(dm05, shape):
    cat = rgb(IMAGES / "cat_720p.jpg")  # 1280x720
    frame = cat if shape == (720, 1280) else np.ascontiguousarray(np.rot90(cat))
    result = dm05.segment(frame)
    assert result.mask.shape == shape
    g = result.geometry
    assert result.model_mask.shape == (g.scaled_h, g.scaled_w)
    # the pad region of the input tensor holds the zero point: it means 0 after normalisation
    tensor = fed(dm05.model)
    if g.scaled_h < 513:
        assert (tensor[g.scaled_h:, :] == 128).all()
    else:
        assert (tensor[:, g.scaled_w:] == 128).all()
    # the cat dominates both orientations
    assert "8" in {str(c) for c in postprocess.present_classes(result.mask)}


def test_frame_at_model_size_is_fed_unchanged(dm05):
    frame = bird_513()
    g = dm05.model.set_frame(frame)
    assert not g.resized
    assert np.array_equal(fed(dm05.model), frame)


def test_float_input_pads_with_exact_zero():
    seg = Segmenter(str(FLOAT_257))
    frame = np.full((720, 1280, 3), 255, np.uint8)
    g = seg.model.set_frame(frame)
    tensor = fed(seg.model)
    assert np.allclose(tensor[: g.scaled_h, : g.scaled_w], 1.0)
    assert (tensor[g.scaled_h:, :] == 0.0).all()
