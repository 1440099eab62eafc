"""Frame labels (issue 25): every per-frame message the agent publishes names its frame's seq.

The mask PNG and the overlay JPEG carry ``{"seq": N[, "camera": C]}`` inside the payload (a PNG
tEXt chunk, a JPEG COM segment: they survive MQTT 3.1.1 and any store-and-forward), the result
JSON as fields; common decoders (OpenCV, PIL) read the images as before.
"""

from __future__ import annotations

import io
import json

import cv2
import numpy as np
from PIL import Image

from edge_agent.output import encode as enc
from edge_agent.output import stages
from edge_agent.output.topics import split_camera_suffix
from edge_agent.sources.base import Frame


def _frame(seq: int) -> Frame:
    image = np.full((48, 64, 3), 90, np.uint8)
    return Frame(image=image, seq=seq, timestamp=1767225600.0 + seq, monotonic=float(seq), source="test")


def _masks() -> stages.Masks:
    mask = np.zeros((48, 64), np.uint8)
    mask[10:30, 5:40] = 8  # cat
    return stages.Masks(mask, mask, {"background": 0.77, "cat": 0.23})


def test_every_message_of_a_frame_carries_its_seq_and_camera():
    for camera in ("", "door"):
        opts = stages.EncodeOptions(overlay=True)
        messages, mask_seq = stages.encode(_frame(41), _masks(), "a" * 64, opts, None, camera=camera)
        # a camera with an id publishes on camera/<id>/<kind> (README "Several cameras")
        parts = {}
        for suffix, payload in messages:
            assert split_camera_suffix(suffix) == (camera, split_camera_suffix(suffix)[1]), suffix
            parts[split_camera_suffix(suffix)[1]] = payload
        assert set(parts) == {"result", "mask", "overlay"} and mask_seq == 41
        result = json.loads(parts["result"])
        assert result["seq"] == 41 and result["mask_seq"] == 41
        assert result.get("camera") == (camera or None)
        want = {"seq": 41, "camera": camera} if camera else {"seq": 41}
        assert enc.read_frame_label(parts["mask"]) == want
        assert enc.read_frame_label(parts["overlay"]) == want
        # the images decode as before (ids lossless; the overlay is a JPEG of the frame's size)
        assert np.array_equal(enc.decode_mask_png(parts["mask"]), _masks().model_mask)
        assert np.array_equal(np.array(Image.open(io.BytesIO(parts["mask"]))), _masks().model_mask)
        photo = cv2.imdecode(np.frombuffer(parts["overlay"], np.uint8), cv2.IMREAD_COLOR)
        assert photo.shape == (48, 64, 3)
        assert Image.open(io.BytesIO(parts["overlay"])).size == (64, 48)


def test_grey_masks_are_labelled_too_and_unlabelled_images_have_no_label():
    messages, _ = stages.encode(_frame(7), _masks(), "a" * 64, stages.EncodeOptions(mask_format="grey"), None)
    png = dict(messages)["mask"]
    assert png[25] == 0 and enc.read_frame_label(png) == {"seq": 7}  # colour type still at byte 25
    assert np.array_equal(cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_UNCHANGED), _masks().model_mask)
    assert enc.read_frame_label(enc.encode_mask_png(_masks().model_mask)) is None
    assert enc.read_frame_label(enc.encode_jpeg(np.zeros((8, 8, 3), np.uint8))) is None
    assert enc.read_frame_label(b"not an image") is None
    assert enc.read_frame_label(enc.encode_mask_png(_masks().model_mask, label=b"{broken")) is None


def test_frame_output_labels_with_its_camera():
    """FrameOutput (one per camera stream) passes its camera id to every frame it encodes."""
    out = stages.FrameOutput(stages.OutputSettings(overlay=True), camera="yard")
    assert out.camera == "yard"
    messages, _ = stages.encode(_frame(3), _masks(), "a" * 64, stages.EncodeOptions(), None, camera=out.camera)
    assert enc.read_frame_label(dict(messages)["camera/yard/mask"]) == {"seq": 3, "camera": "yard"}
