"""Frame sources against real OpenCV decoding, real files and folders, and FakePicamera2.

Failure handling is exercised for real: files and folders are renamed away mid-run and back,
a stream (an FFmpeg ``file://`` URL, read through the live-source grabber thread) ends, a
camera stalls; every time the frame sequence must continue without gaps or repeats.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Callable, List, Optional

import cv2
import numpy as np
import pytest

from edge_agent.errors import SourceError
from edge_agent.sources import (
    EndOfStream,
    Frame,
    FrameSource,
    ReopeningSource,
    SourceSettings,
    available_kinds,
    build_source,
    open_source,
)
from edge_agent.sources.picamera2 import (FORMATS, INSTALL_HINT, Picamera2Source, default_lores_size,
                                          i420_to_rgb, select_camera, to_rgb)
from edge_agent.sources.synthetic import pattern
from tests import helpers
from tests.fakes.fake_picamera2 import FakePicamera2, install, rgb_to_i420_padded, stream_array

FAST = {"reopen_backoff_initial_s": 0.05, "reopen_backoff_max_s": 0.2}

# Frame i of the generated clip is a solid colour from this RGB list (cycled), so decoding order,
# loop restarts and RGB channel order can all be checked.
CLIP_COLORS = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255), (0, 0, 0), (255, 255, 0)]
CLIP_FRAMES = 12


def write_clip(path: Path, frames: int = CLIP_FRAMES, size=(96, 64)) -> Path:
    return helpers.write_clip(path, frames, CLIP_COLORS, size)


def clip_index(frame: Frame) -> int:
    """Which CLIP_COLORS entry a decoded frame shows (MJPEG is lossy: nearest colour)."""
    mean = frame.image.reshape(-1, 3).mean(axis=0)
    dists = [np.abs(mean - np.array(c)).sum() for c in CLIP_COLORS]
    assert min(dists) < 40, f"frame colour {mean} is none of the clip colours"
    return int(np.argmin(dists))


def check_frame(frame: Frame) -> None:
    assert frame.image.dtype == np.uint8 and frame.image.ndim == 3 and frame.image.shape[2] == 3
    assert frame.image.flags.c_contiguous
    assert abs(frame.timestamp - time.time()) < 60
    assert frame.monotonic <= time.monotonic()


def read_until(
    src: FrameSource, cond: Callable[[List[Frame]], bool], limit_s: float = 10.0
) -> List[Frame]:
    """Read frames until ``cond(frames)`` holds; fail (not hang) after ``limit_s``."""
    frames: List[Frame] = []
    deadline = time.monotonic() + limit_s
    while not cond(frames):
        assert time.monotonic() < deadline, f"condition not reached; stats {src.stats()}"
        frame = src.read(timeout=0.1)
        if frame is not None:
            check_frame(frame)
            frames.append(frame)
    return frames


def assert_seq_continuous(frames: List[Frame]) -> None:
    seqs = [f.seq for f in frames]
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs))), seqs


# -- registry and settings ------------------------------------------------------------------


def test_registry_lists_every_backend():
    assert set(available_kinds()) >= {"picamera2", "opencv", "folder", "synthetic"}


def test_settings_from_mapping_or_attributes_and_bad_values():
    ns = SimpleNamespace(kind="Synthetic", uri="", loop=True, width=32, height=24, fps=0,
                         stall_timeout_s=1, reopen_backoff_max_s=2)
    s = SourceSettings.from_any(ns)
    assert (s.kind, s.width, s.height, s.reopen_backoff_max_s) == ("synthetic", 32, 24, 2.0)
    with pytest.raises(SourceError, match="fps"):
        SourceSettings.from_any({"kind": "synthetic", "fps": -1})
    with pytest.raises(SourceError, match="unknown source kind 'webcam'"):
        open_source({"kind": "webcam"})


# -- synthetic ------------------------------------------------------------------------------


def test_synthetic_moves_and_counts():
    src = open_source({"kind": "synthetic", "width": 64, "height": 48})
    try:
        frames = [src.read(1.0) for _ in range(3)]
    finally:
        src.close()
    assert [f.seq for f in frames] == [1, 2, 3]
    for f in frames:
        check_frame(f)
        assert f.image.shape == (48, 64, 3)
    assert not np.array_equal(frames[0].image, frames[1].image)
    assert np.array_equal(frames[0].image, pattern(64, 48, 0))
    assert src.stats()["frames"] == 3


# -- opencv: files --------------------------------------------------------------------------


def test_opencv_file_decodes_rgb_in_order_then_ends(tmp_path):
    clip = write_clip(tmp_path / "clip.avi")
    src = open_source({"kind": "opencv", "uri": str(clip), "loop": False})
    frames: List[Frame] = []
    with pytest.raises(EndOfStream):
        for _ in range(CLIP_FRAMES + 5):
            f = src.read(1.0)
            if f is not None:
                frames.append(f)
    src.close()
    assert len(frames) == CLIP_FRAMES
    assert [clip_index(f) for f in frames] == [i % len(CLIP_COLORS) for i in range(CLIP_FRAMES)]
    assert frames[0].image.shape == (64, 96, 3)
    red = frames[0].image[32, 48]
    assert red[0] > 200 and red[2] < 60, f"first frame should be red in RGB, got {red}"
    assert_seq_continuous(frames)


def test_opencv_file_loops(tmp_path):
    clip = write_clip(tmp_path / "clip.avi")
    src = open_source({"kind": "opencv", "uri": str(clip), "loop": True})
    try:
        frames = read_until(src, lambda fs: len(fs) >= 2 * CLIP_FRAMES + 3)
    finally:
        src.close()
    idx = [clip_index(f) for f in frames]
    assert idx == [(i % CLIP_FRAMES) % len(CLIP_COLORS) for i in range(len(frames))]
    assert_seq_continuous(frames)
    assert src.stats()["errors"] == 0


def test_opencv_file_deleted_midrun_reopens_with_backoff_and_seq_continues(tmp_path, caplog):
    clip = write_clip(tmp_path / "clip.avi")
    away = tmp_path / "away.avi"
    src = open_source({"kind": "opencv", "uri": str(clip), "loop": True, **FAST})
    try:
        before = read_until(src, lambda fs: len(fs) >= 3)
        clip.rename(away)  # "deleted": the next loop's reopen fails
        with caplog.at_level(logging.WARNING, logger="edge_agent.sources.reopen"):
            during = read_until(src, lambda fs: src.stats()["errors"] >= 3)
        assert src.stats()["state"] == "down"
        away.rename(clip)
        after = read_until(src, lambda fs: len(fs) >= 5)
    finally:
        src.close()
    frames = before + during + after
    assert_seq_continuous(frames)
    stats = src.stats()
    assert stats["reopens"] >= 1 and stats["errors"] >= 3
    assert "does not exist (source.uri)" in stats["last_error"]
    failures = [r for r in caplog.records if "reopen failed" in r.getMessage()]
    assert len(failures) >= 2, "one log line per failed attempt"
    # Exponential backoff: the announced delays grow (0.05, 0.1, 0.2, 0.2 ...), capped.
    delays = [float(r.getMessage().rsplit("in ", 1)[1].split()[0]) for r in failures]
    assert delays[:3] == sorted(delays[:3]) and max(delays) <= 0.2


def test_opencv_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(SourceError, match="video file .* does not exist"):
        open_source({"kind": "opencv", "uri": str(tmp_path / "nope.mp4")})
    bad = tmp_path / "bad.avi"
    bad.write_bytes(b"not a video at all" * 10)
    with pytest.raises(SourceError, match="cannot decode video file"):
        open_source({"kind": "opencv", "uri": str(bad)})
    with pytest.raises(SourceError, match="needs source.uri"):
        open_source({"kind": "opencv", "uri": ""})


def test_opencv_stream_path_reopens_when_the_stream_ends(tmp_path):
    """A URL goes through the live path (grabber thread, newest frame wins); when the stream
    ends the grabber reports it, the wrapper reopens, and seq carries on."""
    clip = write_clip(tmp_path / "clip.avi", frames=6)
    src = open_source({"kind": "opencv", "uri": f"file://{clip}", **FAST})
    assert src.name == f"opencv:file://{clip}"
    try:
        frames = read_until(src, lambda fs: src.stats()["reopens"] >= 2 and len(fs) >= 4)
    finally:
        src.close()
    assert_seq_continuous(frames)
    assert "capture returned no frame" in src.stats()["last_error"]


# -- folder ---------------------------------------------------------------------------------


def make_folder(folder: Path) -> List[np.ndarray]:
    folder.mkdir(parents=True, exist_ok=True)
    imgs = [np.full((20, 30, 3), c, np.uint8) for c in CLIP_COLORS[:3]]
    cv2.imwrite(str(folder / "a.png"), cv2.cvtColor(imgs[0], cv2.COLOR_RGB2BGR))
    (folder / "b.jpg").write_bytes(b"\xff\xd8 truncated, not a jpeg")
    cv2.imwrite(str(folder / "c.bmp"), cv2.cvtColor(imgs[1], cv2.COLOR_RGB2BGR))
    cv2.imwrite(str(folder / "d.PNG"), cv2.cvtColor(imgs[2], cv2.COLOR_RGB2BGR))
    (folder / "notes.txt").write_text("not an image")
    return imgs


def test_folder_sorted_loop_skips_unreadable(tmp_path, caplog):
    imgs = make_folder(tmp_path / "imgs")
    with caplog.at_level(logging.WARNING, logger="edge_agent.sources.folder"):
        src = open_source({"kind": "folder", "uri": str(tmp_path / "imgs"), "loop": True})
        try:
            frames = read_until(src, lambda fs: len(fs) >= 7)
            stats = src.stats()
        finally:
            src.close()
    for i, f in enumerate(frames):
        assert np.array_equal(f.image, imgs[i % 3]), f"frame {i} out of order or wrong colours"
    assert_seq_continuous(frames)
    assert stats["skipped"] == 2  # 7 frames = a c d a c d a: b.jpg passed twice
    warnings = [r for r in caplog.records if "b.jpg" in r.getMessage()]
    assert len(warnings) == 1, "warn once per file, count every skip"


def test_folder_glob_without_loop_ends(tmp_path):
    make_folder(tmp_path / "imgs")
    src = open_source({"kind": "folder", "uri": str(tmp_path / "imgs" / "*.png"), "loop": False})
    got = [src.read(1.0), None]
    with pytest.raises(EndOfStream):
        got[1] = src.read(1.0)
    with pytest.raises(EndOfStream):
        src.read(1.0)  # stays ended
    src.close()
    assert got[0] is not None and got[0].image.shape == (20, 30, 3)


def test_folder_empty_or_unreadable_is_a_clear_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(SourceError, match="no images in"):
        open_source({"kind": "folder", "uri": str(tmp_path / "empty")})
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "x.jpg").write_bytes(b"junk")
    src = build_source({"kind": "folder", "uri": str(tmp_path / "junk")})
    src.open()
    with pytest.raises(SourceError, match="no readable image"):
        src.read(1.0)


def test_folder_renamed_away_and_back(tmp_path):
    folder = tmp_path / "imgs"
    make_folder(folder)
    src = open_source({"kind": "folder", "uri": str(folder), **FAST})
    try:
        before = read_until(src, lambda fs: len(fs) >= 2)
        folder.rename(tmp_path / "gone")
        read_until(src, lambda fs: src.stats()["errors"] >= 2)
        (tmp_path / "gone").rename(folder)
        after = read_until(src, lambda fs: len(fs) >= 2)
    finally:
        src.close()
    assert_seq_continuous(before + after)
    assert src.stats()["reopens"] >= 1


# -- picamera2 (FakePicamera2) --------------------------------------------------------------


def color_scene(h: int = 480, w: int = 640) -> np.ndarray:
    """Four solid quadrants (red, green, blue, white) and a grey band: easy colour checks."""
    scene = np.zeros((h, w, 3), np.uint8)
    scene[: h // 2, : w // 2] = (255, 0, 0)
    scene[: h // 2, w // 2 :] = (0, 255, 0)
    scene[h // 2 :, : w // 2] = (0, 0, 255)
    scene[h // 2 :, w // 2 :] = (255, 255, 255)
    scene[h // 2 - 8 : h // 2 + 8] = (128, 128, 128)
    return scene


def test_lores_default_size_fits_model_and_keeps_aspect():
    assert default_lores_size((1280, 720), (513, 513)) == (512, 288)
    assert default_lores_size((640, 480), (257, 257)) == (256, 192)
    assert default_lores_size((320, 240), (513, 513)) == (320, 240)  # never upscale


def test_i420_conversion_matches_rgb_and_crops_stride_padding():
    rng = np.random.default_rng(0)
    # 4x4 blocks of random colours: aligned with the 2x2 chroma subsampling of 4:2:0.
    rgb = np.repeat(np.repeat(rng.integers(0, 256, (15, 25, 3), dtype=np.uint8), 4, 0), 4, 1)
    padded = rgb_to_i420_padded(rgb, stride=128)
    assert padded.shape == (90, 128)
    out = i420_to_rgb(padded, 100)
    assert out.shape == (60, 100, 3) and out.flags.c_contiguous
    err = np.abs(out.astype(int) - rgb)
    assert err.mean() < 2 and err.max() <= 8, (err.mean(), err.max())
    swapped = np.abs(out[:, :, ::-1].astype(int) - rgb).mean()
    assert swapped > 20, "R and B must not be swapped"


def test_picamera2_configures_lores_and_delivers_correct_rgb(monkeypatch):
    scene = color_scene()
    fake = install(monkeypatch, scene)
    src = open_source({"kind": "picamera2", "width": 640, "height": 480, "fps": 15,
                       "lores_size": (200, 150)})
    try:
        frames = [src.read(1.0) for _ in range(3)]
    finally:
        src.close()
    cam = fake.instances[-1]
    req = cam.requested
    assert req["use_case"] == "video"
    assert req["main"] == {"size": (640, 480), "format": "YUV420"}
    assert req["lores"] == {"size": (200, 150), "format": "YUV420"}
    assert req["colour_space"].name == "Smpte170m", "OpenCV's I420 matrix is BT.601 limited"
    assert req["queue"] is False and req["controls"] == {"FrameRate": 15.0}
    assert cam.camera_config["lores"]["stride"] == 256  # padded: the crop is exercised
    assert cam.closed
    assert [f.seq for f in frames] == [1, 2, 3]
    img = frames[0].image
    check_frame(frames[0])
    assert img.shape == (150, 200, 3)
    expected = cv2.resize(scene, (200, 150), interpolation=cv2.INTER_AREA)
    for (y, x), rgb in {(30, 50): (255, 0, 0), (30, 150): (0, 255, 0),
                        (120, 50): (0, 0, 255), (120, 150): (255, 255, 255),
                        (75, 100): (128, 128, 128)}.items():
        assert np.abs(img[y, x].astype(int) - rgb).max() <= 6, (y, x, img[y, x])
    assert np.abs(img.astype(int) - expected).mean() < 4
    assert not (img == 77).all(axis=2).any(), "stride padding leaked into the image"


def test_picamera2_default_lores_from_model_input(monkeypatch):
    fake = install(monkeypatch, color_scene(720, 1280))
    src = open_source({"kind": "picamera2", "model_input": (513, 513), "width": 1280, "height": 720})
    try:
        frame = src.read(1.0)
    finally:
        src.close()
    assert fake.instances[-1].requested["main"]["size"] == (1280, 720)
    assert frame.image.shape == (288, 512, 3)


def test_picamera2_stall_reopens_and_seq_continues(monkeypatch):
    fake = install(monkeypatch, color_scene())
    src = open_source({"kind": "picamera2", "width": 640, "height": 480,
                       "stall_timeout_s": 0.3, **FAST})
    try:
        before = read_until(src, lambda fs: len(fs) >= 2)
        fake.stalled = True
        read_until(src, lambda fs: src.stats()["stalls"] >= 1, limit_s=5)
        fake.stalled = False
        after = read_until(src, lambda fs: len(fs) >= 2)
    finally:
        src.close()
    assert_seq_continuous(before + after)
    stats = src.stats()
    assert stats["reopens"] >= 1 and "stall" in stats["last_error"]
    assert fake.opens >= 2 and all(cam.closed for cam in fake.instances)


def test_picamera2_missing_or_bad_camera_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "picamera2", None)
    with pytest.raises(SourceError) as err:
        open_source({"kind": "picamera2"})
    assert str(err.value) == INSTALL_HINT
    fake = install(monkeypatch, color_scene())
    with pytest.raises(SourceError) as err:
        open_source({"kind": "picamera2", "uri": "1"})
    assert "\n" not in str(err.value) and "no camera 1" in str(err.value)
    assert "0: imx708 (id /base/axi/pcie@120000/rp1/i2c@88000/imx708@1a)" in str(err.value)
    with pytest.raises(SourceError, match="no camera '/dev/video0'"):
        open_source({"kind": "picamera2", "uri": "/dev/video0"})
    with pytest.raises(SourceError, match="cannot configure"):
        open_source({"kind": "picamera2", "width": 320, "height": 240, "lores_size": (640, 480)})
    with pytest.raises(SourceError, match="source.format 'YUYV'"):
        open_source({"kind": "picamera2", "format": "YUYV"})
    assert all(cam.closed for cam in fake.instances)


# Known colours in 4x4 blocks (aligned with 4:2:0 chroma): red, green, blue, white, black, grey,
# yellow, magenta; each format's layout must come back as exactly these (YUV: within rounding).
KNOWN = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255), (0, 0, 0), (128, 128, 128),
         (255, 255, 0), (255, 0, 255)]


def known_blocks() -> np.ndarray:
    rgb = np.zeros((8, 32, 3), np.uint8)
    for i, colour in enumerate(KNOWN):
        rgb[:, 4 * i: 4 * i + 4] = colour
    return rgb


@pytest.mark.parametrize("fmt", FORMATS)
def test_every_picamera2_format_converts_known_colours(fmt):
    """picamera2 (0.3.38 request.py) names formats like DRM: RGB888 is B,G,R in memory, BGR888
    R,G,B, XRGB8888 B,G,R,X, XBGR8888 R,G,B,X; YUV420/YVU420 come as (h*3/2, stride), NV12/NV21 as
    (h*3/2, w). A swapped pair (R<->B, U<->V) would turn red into blue: checked per block."""
    rgb = known_blocks()
    stride = 64
    array = stream_array(rgb, fmt, stride)
    if fmt == "RGB888":
        assert array[0, 0].tolist() == [0, 0, 255], "red is B,G,R = 0,0,255 in memory"
    if fmt == "XBGR8888":
        assert array[0, 0, :3].tolist() == [255, 0, 0], "red is R,G,B,X in memory"
    out = to_rgb(array, fmt, (32, 8))
    assert out.shape == (8, 32, 3) and out.dtype == np.uint8 and out.flags.c_contiguous
    tolerance = 0 if fmt in ("RGB888", "BGR888", "XRGB8888", "XBGR8888") else 3
    for i, colour in enumerate(KNOWN):
        block = out[:, 4 * i: 4 * i + 4].reshape(-1, 3).astype(int)
        assert np.abs(block - colour).max() <= tolerance, (fmt, colour, block[0])


def test_nv12_with_stride_left_in_is_cropped():
    rgb = known_blocks()
    nv12 = stream_array(rgb, "NV12", 0)
    padded = np.full((12, 48), 77, np.uint8)
    padded[:, :32] = nv12
    assert np.abs(to_rgb(padded, "NV12", (32, 8)).astype(int) - rgb).max() <= 3


def test_unknown_format_or_shape_is_one_line():
    with pytest.raises(SourceError) as err:
        to_rgb(np.zeros((8, 16, 2), np.uint8), "YUYV", (16, 8))
    assert "'YUYV'" in str(err.value) and "source.format" in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(SourceError, match="NV12 frame has shape"):
        to_rgb(np.zeros((8, 16), np.uint8), "NV12", (16, 8))


def test_picamera2_geometry_comes_from_what_the_camera_gave(monkeypatch, caplog):
    """Asked YUV420, given NV12 (as libcamera's virtual camera does): converted as NV12, and the
    log line says what was given and what was asked."""
    scene = color_scene()
    fake = install(monkeypatch, scene)
    fake.gives_format = "NV12"
    caplog.set_level(logging.INFO, logger="edge_agent.sources.picamera2")
    src = open_source({"kind": "picamera2", "width": 640, "height": 480, "lores_size": (200, 150)})
    try:
        frame = src.read(1.0)
    finally:
        src.close()
    assert fake.instances[-1].requested["lores"]["format"] == "YUV420"
    line = next(r.getMessage() for r in caplog.records if "lores" in r.getMessage())
    assert "main 640x480 NV12 (asked YUV420)" in line and "lores 200x150 NV12 (asked YUV420)" in line, line
    assert line.endswith("capturing lores, colour space Smpte170m"), line
    for (y, x), rgb in {(30, 50): (255, 0, 0), (30, 150): (0, 255, 0), (120, 50): (0, 0, 255)}.items():
        assert np.abs(frame.image[y, x].astype(int) - rgb).max() <= 6, (y, x, frame.image[y, x])
    assert any("camera 0 closed" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("fmt", ["XRGB8888", "RGB888", "NV21"])
def test_picamera2_source_format_is_asked_and_converted(monkeypatch, fmt):
    fake = install(monkeypatch, color_scene())
    fake.lores_rgb = True  # Pi 5 (PiSP): the lores stream may be RGB
    src = open_source({"kind": "picamera2", "width": 640, "height": 480, "lores_size": (200, 150),
                       "format": fmt})
    try:
        frame = src.read(1.0)
    finally:
        src.close()
    assert fake.instances[-1].requested["lores"]["format"] == fmt
    assert np.abs(frame.image[30, 50].astype(int) - (255, 0, 0)).max() <= 6
    assert np.abs(frame.image[120, 50].astype(int) - (0, 0, 255)).max() <= 6


def test_picamera2_camera_without_lores_is_captured_on_main(monkeypatch):
    fake = install(monkeypatch, color_scene())
    fake.drops_lores, fake.gives_format = True, "XBGR8888"
    src = open_source({"kind": "picamera2", "width": 320, "height": 240, "lores_size": (160, 120)})
    try:
        frame = src.read(1.0)
    finally:
        src.close()
    assert frame.image.shape == (240, 320, 3)
    assert np.abs(frame.image[60, 80].astype(int) - (255, 0, 0)).max() <= 2


def test_picamera2_unknown_format_given_is_refused_and_closed(monkeypatch):
    fake = install(monkeypatch, color_scene())
    fake.gives_format = "YUYV"
    with pytest.raises(SourceError) as err:
        open_source({"kind": "picamera2"})
    assert "'YUYV'" in str(err.value) and "set source.format to one of" in str(err.value)
    assert fake.instances[-1].closed


CAMERAS = [  # as picamera2 orders global_camera_info(): Num is libcamera's order, not the position
    {"Model": "imx708", "Location": 2, "Rotation": 180, "Id": "/base/axi/pcie@120000/rp1/i2c@88000/imx708@1a", "Num": 1},
    {"Model": "imx219", "Location": 2, "Rotation": 0, "Id": "/base/axi/pcie@120000/rp1/i2c@80000/imx219@10", "Num": 0},
    {"Model": "ov5647", "Location": 2, "Rotation": 0, "Id": "/base/axi/pcie@120000/rp1/usb@200000-1:1.0-046d:0825", "Num": 2},
]


def test_select_camera_by_position_id_and_model():
    assert select_camera(CAMERAS, "") == 0
    assert select_camera(CAMERAS, "1") == 1  # the position, not Num
    assert select_camera(CAMERAS, CAMERAS[1]["Id"]) == 1
    assert select_camera(CAMERAS, "ov5647") == 2
    assert select_camera(CAMERAS, "IMX219") == 1  # a Model, ignoring case
    with pytest.raises(SourceError) as err:
        select_camera(CAMERAS, "imx477")
    text = str(err.value)
    assert "no camera 'imx477'" in text and "1: imx219 (id /base/axi/pcie@120000/rp1/i2c@80000/imx219@10)" in text
    with pytest.raises(SourceError, match="cameras libcamera sees: none"):
        select_camera([], "0")


@pytest.mark.parametrize("uri,position", [("1", 1), (CAMERAS[2]["Id"], 2), ("imx708", 0)])
def test_picamera2_opens_the_selected_camera(monkeypatch, uri, position):
    fake = install(monkeypatch, color_scene())
    fake.cameras = CAMERAS
    src = open_source({"kind": "picamera2", "uri": uri, "width": 640, "height": 480})
    try:
        assert src.read(1.0) is not None
    finally:
        src.close()
    assert fake.instances[-1].camera_num == position  # Picamera2(position)


def test_picamera2_missing_camera_is_retried_with_backoff_and_picked_up(monkeypatch):
    """The daemon's path (open_source strict=False, as agent.start_pipeline): no camera at start is
    a logged failure retried with backoff; once one appears (after re-enumerating cameras) frames
    flow. The real stack's version is tests/test_picamera2_real.py."""
    fake = install(monkeypatch, color_scene())
    fake.cameras = 0
    src = open_source({"kind": "picamera2", "width": 640, "height": 480, **FAST}, strict=False)
    try:
        assert src.read(0.05) is None
        stats = src.stats()
        assert stats["state"] == "down" and "no camera 0" in stats["last_error"]
        read_until(src, lambda fs: src.stats()["errors"] >= 2, limit_s=5)
        fake.cameras = 1
        frames = read_until(src, lambda fs: len(fs) >= 1, limit_s=5)
    finally:
        src.close()
    assert frames and src.stats()["reopens"] >= 1
    assert fake._cm.resets >= 1, "a camera manager with no camera open is re-enumerated"


def test_wrapper_never_raises_transient_errors():
    """A backend that raises on every other read: read() returns None, counters say so."""

    class Flaky:
        name = "flaky"
        calls = 0

        def open(self) -> None:
            pass

        def close(self) -> None:
            pass

        def read(self, timeout: float = 1.0) -> Optional[Frame]:
            Flaky.calls += 1
            if Flaky.calls % 2 == 0:
                raise OSError("device went away\nsecond line")
            return Frame(np.zeros((2, 2, 3), np.uint8), 1, time.time(), time.monotonic(), "x")

    src = ReopeningSource(Flaky, "flaky", live=True, stall_timeout_s=0, backoff_initial_s=0.0,
                          backoff_max_s=0.0)
    src.open()
    got = [src.read(0.1) for _ in range(8)]
    src.close()
    frames = [f for f in got if f is not None]
    assert [f.seq for f in frames] == list(range(1, len(frames) + 1)) and len(frames) >= 3
    stats = src.stats()
    assert stats["errors"] >= 2 and stats["last_error"] == "read failed: OSError: device went away"
    assert stats["state"] == "closed"
    with pytest.raises(SourceError, match="closed"):
        src.read(0.1)


def test_non_strict_open_waits_for_a_source_that_appears_later(tmp_path):
    """At boot the camera/file may come up after the agent: strict=False retries the first open."""
    clip = tmp_path / "late.avi"
    src = open_source({"kind": "opencv", "uri": str(clip), **FAST}, strict=False)
    try:
        assert src.read(0.1) is None and src.stats()["state"] == "down"
        assert "does not exist (source.uri)" in src.stats()["last_error"]
        write_clip(clip)
        frames = read_until(src, lambda fs: len(fs) >= 3)
    finally:
        src.close()
    assert [f.seq for f in frames] == [1, 2, 3]
    with pytest.raises(SourceError, match="unknown source kind"):
        open_source({"kind": "nope"}, strict=False)  # config errors are never retried
