"""FakePicamera2: a stand-in for ``picamera2.Picamera2`` (and ``libcamera.ColorSpace``).

Mirrors the parts of picamera2's API the agent uses, with picamera2's real data layout:
``create_preview_configuration``/``create_video_configuration`` return dicts, ``configure``
checks the lores rules of the Pi ISP (YUV420, even size, not larger than main) and fills in
``camera_config`` with size/format/stride, ``capture_array("lores")`` returns a
``(h*3/2, stride)`` I420 array whose right-hand padding holds junk (as on hardware, where the
stride is 64-byte aligned), ``capture_array(name, wait=False)`` returns a job for
``wait(job, timeout)`` which raises TimeoutError while the camera is stalled.

The picture is ``scene`` (an RGB image) resized to the lores size and converted to I420 with
OpenCV's BT.601 limited-range matrix, which is what ColorSpace.Smpte170m() asks the ISP for.
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
        return f"<ColorSpace {self.name}>"

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


class FakeJob:
    def __init__(self, name: str) -> None:
        self.name = name


class FakePicamera2:
    """Class-level knobs a test sets before the source opens the camera."""

    scene: np.ndarray = np.zeros((480, 640, 3), np.uint8)
    cameras = 1
    stalled = False  # when True, wait() times out and capture blocks like a dead sensor
    instances: List["FakePicamera2"] = []
    opens = 0

    def __init__(self, camera_num: int = 0, tuning: Any = None) -> None:
        if camera_num >= type(self).cameras:
            raise IndexError("list index out of range")  # what picamera2 raises
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
            if lores["format"] not in ("YUV420", "YVU420"):
                raise RuntimeError("lores stream must be YUV")
            if lw > mw or lh > mh:
                raise RuntimeError("lores stream dimensions may not exceed main stream")
            if lw % 2 or lh % 2:
                raise RuntimeError("lores size must be even")
            lores = dict(lores, stride=-(-lw // STRIDE_ALIGN) * STRIDE_ALIGN)
        self.requested = config
        self.camera_config = dict(config, main=dict(main, stride=main["size"][0] * 4), lores=lores)

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
        if cfg["format"] == "YUV420":
            return rgb_to_i420_padded(rgb, cfg["stride"])
        return np.ascontiguousarray(rgb[:, :, ::-1])  # "RGB888" is B,G,R in memory

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
