"""FakePicamera2: a stand-in for ``picamera2.Picamera2`` (and ``libcamera.ColorSpace``).

Mirrors the parts of picamera2's API the agent uses, with picamera2's real data layout:
``create_preview_configuration``/``create_video_configuration`` return dicts, ``configure``
checks the lores rules of the Pi ISP (YUV420, even size, not larger than main) and fills in
``camera_config`` with size/format/stride, ``capture_array("lores")`` returns a
``(h*3/2, stride)`` I420 array whose right-hand padding holds junk (as on hardware, where the
stride is 64-byte aligned), ``capture_array(name, wait=False)`` returns a job for
``wait(job, timeout)`` which raises TimeoutError while the camera is stalled.

The picture is ``scene`` (an RGB image) resized to the stream's size and laid out in the format
the camera GAVE, the way picamera2 0.3.38's ``Helpers._make_array_shared`` hands it out: YUV420 /
YVU420 ``(h*3/2, stride)`` with junk padding, NV12/NV21 ``(h*3/2, w)``, RGB888 B,G,R and BGR888
R,G,B in memory, XRGB8888 B,G,R,X and XBGR8888 R,G,B,X. YUV uses OpenCV's BT.601 limited-range
matrix, which is what ColorSpace.Smpte170m() asks the ISP for.

Knobs for failure injection and selection: ``cameras`` (a count, or the list of
``global_camera_info()`` dicts), ``gives_format`` (the lores format the camera gives whatever was
asked, as libcamera's virtual camera gives NV12), ``lores_rgb`` (Pi 5: RGB lores allowed),
``stalled``. ``_cm`` stands in for picamera2's camera manager (``reset()`` counted).

This is a fake: tests/test_picamera2_real.py runs the same source against real picamera2 0.3.38 and
libcamera 0.7.1 on libcamera's virtual camera.
"""

from __future__ import annotations

import sys
import threading
import types
from typing import Any, Dict, List, Optional

import cv2
import numpy as np

STRIDE_ALIGN = 64
PAD_JUNK = 77


class FakeColorSpace:
    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return f"<libcamera.ColorSpace '{self.name}'>"  # as libcamera's Python binding prints it

    @staticmethod
    def Smpte170m() -> "FakeColorSpace":
        return FakeColorSpace("Smpte170m")

    @staticmethod
    def Rec709() -> "FakeColorSpace":
        return FakeColorSpace("Rec709")

    @staticmethod
    def Sycc() -> "FakeColorSpace":
        return FakeColorSpace("Sycc")


def rgb_to_i420_padded(rgb: np.ndarray, stride: int) -> np.ndarray:
    """RGB (h, w, 3) -> picamera2's YUV420 array (h*3/2, stride) with junk in the padding."""
    h, w = rgb.shape[:2]
    i420 = cv2.cvtColor(rgb, cv2.COLOR_RGB2YUV_I420).reshape(-1)
    y = i420[: h * w].reshape(h, w)
    u = i420[h * w : h * w * 5 // 4].reshape(h // 2, w // 2)
    v = i420[h * w * 5 // 4 :].reshape(h // 2, w // 2)
    planes = []
    for plane, pw in ((y, stride), (u, stride // 2), (v, stride // 2)):
        padded = np.full((plane.shape[0], pw), PAD_JUNK, np.uint8)
        padded[:, : plane.shape[1]] = plane
        planes.append(padded.reshape(-1))
    return np.concatenate(planes).reshape(h * 3 // 2, stride)


def rgb_to_nv12(rgb: np.ndarray, swap: bool = False) -> np.ndarray:
    """RGB (h, w, 3) -> NV12 (or NV21 with ``swap``) as picamera2 returns it: (h*3/2, w)."""
    h, w = rgb.shape[:2]
    i420 = cv2.cvtColor(rgb, cv2.COLOR_RGB2YUV_I420).reshape(-1)
    y = i420[: h * w].reshape(h, w)
    u = i420[h * w : h * w * 5 // 4].reshape(h // 2, w // 2)
    v = i420[h * w * 5 // 4 :].reshape(h // 2, w // 2)
    uv = np.empty((h // 2, w), np.uint8)
    uv[:, 0::2], uv[:, 1::2] = (v, u) if swap else (u, v)
    return np.concatenate([y, uv])


def stream_array(rgb: np.ndarray, fmt: str, stride: int) -> np.ndarray:
    """``rgb`` laid out as picamera2's capture_array() gives a stream in ``fmt``."""
    h, w = rgb.shape[:2]
    if fmt == "YUV420":
        return rgb_to_i420_padded(rgb, stride)
    if fmt == "YVU420":  # planes Y, V, U
        i420 = rgb_to_i420_padded(rgb, stride)
        q = h // 4
        return np.concatenate([i420[:h], i420[h + q : h + 2 * q], i420[h : h + q]])
    if fmt in ("NV12", "NV21"):
        return rgb_to_nv12(rgb, swap=fmt == "NV21")
    x = np.full((h, w, 1), PAD_JUNK, np.uint8)
    layouts = {"RGB888": rgb[:, :, ::-1], "BGR888": rgb,
               "XRGB8888": np.concatenate([rgb[:, :, ::-1], x], 2), "XBGR8888": np.concatenate([rgb, x], 2)}
    if fmt in layouts:
        return np.ascontiguousarray(layouts[fmt])
    return np.zeros((h, w, 2), np.uint8)  # e.g. YUYV: a layout the agent does not convert


def _stride(fmt: str, width: int) -> int:
    """Bytes per row as the Pi ISP pads them (64-byte aligned)."""
    bpp = {"RGB888": 3, "BGR888": 3, "XRGB8888": 4, "XBGR8888": 4}.get(fmt, 1)
    return -(-width * bpp // STRIDE_ALIGN) * STRIDE_ALIGN


class FakeCameraManager:
    def __init__(self) -> None:
        self.cameras: Dict[int, Any] = {}
        self.resets = 0

    def reset(self) -> None:
        self.resets += 1


class FakeJob:
    def __init__(self, name: str) -> None:
        self.name = name


class FakePicamera2:
    """Class-level knobs a test sets before the source opens the camera."""

    scene: np.ndarray = np.zeros((480, 640, 3), np.uint8)
    cameras: Any = 1  # a count, or the list global_camera_info() returns
    gives_format: Optional[str] = None
    lores_rgb = False
    drops_lores = False  # a camera with one output: camera_config["lores"] comes back None
    _cm = FakeCameraManager()
    stalled = False  # when True, wait() times out and capture blocks like a dead sensor
    instances: List["FakePicamera2"] = []
    opens = 0

    @classmethod
    def global_camera_info(cls) -> List[Dict[str, Any]]:
        if not isinstance(cls.cameras, int):
            return [dict(c) for c in cls.cameras]
        return [{"Model": "imx708", "Location": 2, "Rotation": 180,
                 "Id": f"/base/axi/pcie@120000/rp1/i2c@{88 - 8 * i}000/imx708@1a", "Num": i}
                for i in range(cls.cameras)]

    def __init__(self, camera_num: int = 0, tuning: Any = None) -> None:
        if camera_num >= len(type(self).global_camera_info()):
            # what picamera2 0.3.38 raises
            raise IndexError(f'No camera number {camera_num} found - use "rpicam-hello --list-cameras" '
                             f'to check connected cameras')
        self.camera_num = camera_num
        self.camera_config: Optional[Dict[str, Any]] = None
        self.started = False
        self.closed = False
        self.frames = 0
        self.requested: Optional[Dict[str, Any]] = None
        type(self).instances.append(self)
        type(self).opens += 1

    # -- configuration ---------------------------------------------------------------------

    def _make_config(self, use_case: str, main=None, lores=None, **kwargs: Any) -> Dict[str, Any]:
        config = {
            "use_case": use_case,
            "main": dict({"size": (640, 480), "format": "XBGR8888"}, **(main or {})),
            "lores": dict({"format": "YUV420"}, **lores) if lores else None,
            "colour_space": kwargs.pop("colour_space", None),
            "controls": kwargs.pop("controls", {}),
            "queue": kwargs.pop("queue", True),
            "buffer_count": kwargs.pop("buffer_count", 6),
        }
        if kwargs:
            raise TypeError(f"unexpected arguments {sorted(kwargs)}")
        return config

    def create_preview_configuration(self, main=None, lores=None, **kwargs: Any) -> Dict[str, Any]:
        return self._make_config("preview", main, lores, **kwargs)

    def create_video_configuration(self, main=None, lores=None, **kwargs: Any) -> Dict[str, Any]:
        return self._make_config("video", main, lores, **kwargs)

    def configure(self, config: Dict[str, Any]) -> None:
        if self.started:
            raise RuntimeError("Camera must be stopped before configuring")
        lores = config.get("lores")
        main = config["main"]
        if lores is not None:
            lw, lh = lores["size"]
            mw, mh = main["size"]
            if not type(self).lores_rgb and lores["format"] not in ("YUV420", "YVU420", "NV12", "NV21"):
                raise RuntimeError("lores stream must be YUV")
            if lw > mw or lh > mh:
                raise RuntimeError("lores stream dimensions may not exceed main stream")
            if lw % 2 or lh % 2:
                raise RuntimeError("lores size must be even")
            fmt = type(self).gives_format or lores["format"]
            lores = dict(lores, format=fmt, stride=_stride(fmt, lw))
        self.requested = config
        main_fmt = type(self).gives_format or main["format"]
        main = dict(main, format=main_fmt, stride=_stride(main_fmt, main["size"][0]))
        self.camera_config = dict(config, main=main, lores=None if type(self).drops_lores else lores)

    # -- running ---------------------------------------------------------------------------

    def start(self, config: Any = None, show_preview: bool = False) -> None:
        if self.camera_config is None:
            raise RuntimeError("Camera has not been configured")
        self.started = True

    def stop(self) -> None:
        self.started = False

    def close(self) -> None:
        self.started = False
        self.closed = True

    def _array(self, name: str) -> np.ndarray:
        if not self.started:
            raise RuntimeError("Camera is not running")
        cfg = self.camera_config[name] if self.camera_config else None
        if cfg is None:
            raise KeyError(f"stream {name!r} is not configured")
        w, h = cfg["size"]
        rgb = cv2.resize(type(self).scene, (w, h), interpolation=cv2.INTER_AREA)
        self.frames += 1
        return stream_array(rgb, cfg["format"], cfg["stride"])

    def capture_array(self, name: str = "main", wait: Any = None, signal_function: Any = None):
        if wait is False:
            return FakeJob(name)
        while type(self).stalled:
            threading.Event().wait(0.01)
        return self._array(name)

    def wait(self, job: FakeJob, timeout: Optional[float] = None) -> np.ndarray:
        if type(self).stalled:
            threading.Event().wait(timeout or 0)
            raise TimeoutError()
        return self._array(job.name)

    @classmethod
    def reset(cls, scene: np.ndarray) -> None:
        cls.scene = scene
        cls.cameras = 1
        cls.gives_format = None
        cls.lores_rgb = False
        cls.drops_lores = False
        cls._cm = FakeCameraManager()
        cls.stalled = False
        cls.instances = []
        cls.opens = 0


def install(monkeypatch: Any, scene: np.ndarray) -> type:
    """Put fake ``picamera2`` and ``libcamera`` modules on sys.modules for one test."""
    FakePicamera2.reset(scene)
    picamera2_mod = types.ModuleType("picamera2")
    picamera2_mod.Picamera2 = FakePicamera2  # type: ignore[attr-defined]
    libcamera_mod = types.ModuleType("libcamera")
    libcamera_mod.ColorSpace = FakeColorSpace  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "picamera2", picamera2_mod)
    monkeypatch.setitem(sys.modules, "libcamera", libcamera_mod)
    return FakePicamera2
