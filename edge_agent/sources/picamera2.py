"""Raspberry Pi camera via picamera2 (libcamera): capture the ISP-scaled ``lores`` stream.

Why lores: the model needs ~513x513, the sensor gives 1280x720 or more. The Pi's ISP can emit a
second, small stream for free; capturing that instead of the main stream saves a full-size copy
and a CPU resize per frame (the letterbox then only pads). On Pi 4 and earlier the lores stream
must be YUV420 and no larger than main, so by default we ask for I420 (``source.format`` asks for
another) and convert with OpenCV.

Which camera (``source.uri``): ``""`` the first, ``"N"`` the N-th of
``Picamera2.global_camera_info()`` (picamera2's own numbering, which ``Picamera2(N)`` uses: that
list's order, not its ``Num`` field), otherwise a camera ``Id`` (e.g.
``/base/axi/pcie@120000/rp1/i2c@88000/imx708@1a``) or a ``Model`` (e.g. ``imx708``, first match).
A camera that is not there is a one-line error listing the cameras libcamera sees; the daemon
retries it with backoff like any source (``ReopeningSource``), re-enumerating cameras each time.

What the camera GAVE decides everything after ``configure``: formats, sizes and strides are read
back from ``camera_config`` (a camera may adjust a request, e.g. libcamera's virtual camera
delivers NV12 whatever was asked), and every format picamera2 hands out for the main/lores
streams of cameras in the field is converted to RGB (:func:`to_rgb`); another one is refused.

Details that matter (picamera2 manual, appendix A, and ``picamera2/request.py``):
* ``capture_array`` on a YUV420/YVU420 stream returns shape ``(h*3/2, stride)``: the Y plane,
  then the two chroma planes at half stride. Converting the whole padded array and cropping the
  width afterwards is correct because the chroma planes use exactly stride/2. NV12/NV21 arrays are
  ``(h*3/2, w)`` (picamera2 slices the padding off; the interleaved chroma rows are as long as the
  luma rows) and are cropped to ``w`` if a stride is left.
* picamera2 names formats like DRM fourccs, i.e. by the 32-bit word, little-endian in memory:
  "RGB888" is B,G,R in memory, "BGR888" is R,G,B, "XRGB8888" is B,G,R,X and "XBGR8888" R,G,B,X
  (``_get_pil_mode``: RGB888 -> "BGR", XBGR8888 -> "RGBX").
* OpenCV's YUV -> RGB uses BT.601 limited-range coefficients, so we request the matching
  ``Smpte170m`` colour space (the video default would be Rec709, preview sYCC full-range).
* ``queue=False``: do not hand us a frame that was completed before we asked (latency).
"""

from __future__ import annotations

import concurrent.futures
import logging
import re
from typing import Any, Dict, List, Optional, Tuple

import cv2
import numpy as np

from edge_agent.errors import SourceError
from edge_agent.sources.base import BaseSource, SourceSettings

log = logging.getLogger(__name__)

DEFAULT_MAIN_SIZE = (1280, 720)  # (w, h)
DEFAULT_MODEL_INPUT = (513, 513)  # (h, w) of the shipped DeepLab models
DEFAULT_FORMAT = "YUV420"  # I420: what every Pi's ISP gives on the lores stream

# picamera2 format name -> how its capture_array() maps to RGB
YUV_CODES = {
    "YUV420": cv2.COLOR_YUV2RGB_I420,  # planar Y, U, V
    "YVU420": cv2.COLOR_YUV2RGB_YV12,  # planar Y, V, U
    "NV12": cv2.COLOR_YUV2RGB_NV12,  # Y, interleaved U,V
    "NV21": cv2.COLOR_YUV2RGB_NV21,  # Y, interleaved V,U
}
# memory order of the channels -> indices that give R, G, B
RGB_ORDERS = {
    "RGB888": (2, 1, 0),  # B,G,R in memory
    "BGR888": (0, 1, 2),  # R,G,B in memory
    "XRGB8888": (2, 1, 0),  # B,G,R,X
    "XBGR8888": (0, 1, 2),  # R,G,B,X
}
FORMATS = tuple(YUV_CODES) + tuple(RGB_ORDERS)

INSTALL_HINT = (
    "picamera2 is not installed: on Raspberry Pi OS `sudo apt install python3-picamera2` "
    "and create the venv with --system-site-packages"
)


def default_lores_size(main_wh: Tuple[int, int], model_hw: Tuple[int, int]) -> Tuple[int, int]:
    """The largest even (w, h) with main's aspect ratio that fits the model input and main."""
    mw, mh = main_wh
    in_h, in_w = model_hw
    scale = min(in_w / mw, in_h / mh, 1.0)
    w = max(2, int(mw * scale) // 2 * 2)
    h = max(2, int(mh * scale) // 2 * 2)
    return (w, h)


def to_rgb(array: np.ndarray, fmt: str, size: Tuple[int, int]) -> np.ndarray:
    """picamera2's ``capture_array`` of a stream in ``fmt`` of ``size`` (w, h) -> HxWx3 RGB,
    padding cropped, C-contiguous. Raises SourceError for a format or shape it cannot convert."""
    w, h = int(size[0]), int(size[1])
    if fmt in YUV_CODES:
        if array.ndim != 2 or array.shape[0] != h * 3 // 2 or array.shape[1] < w:
            raise SourceError(f"{fmt} frame has shape {array.shape}, expected ({h * 3 // 2}, stride >= {w})")
        if fmt.startswith("NV"):  # chroma rows as long as luma rows: crop before converting
            array = array[:, :w]
        rgb = cv2.cvtColor(np.ascontiguousarray(array), YUV_CODES[fmt])
        return np.ascontiguousarray(rgb[:, :w])
    if fmt in RGB_ORDERS:
        channels = 4 if fmt.startswith("X") else 3
        if array.ndim == 2:  # (h, stride) bytes, as some picamera2 versions hand out
            array = array[:, : w * channels].reshape(h, w, channels)
        if array.ndim != 3 or array.shape[:2] != (h, w) or array.shape[2] != channels:
            raise SourceError(f"{fmt} frame has shape {array.shape}, expected ({h}, {w}, {channels})")
        return np.ascontiguousarray(array[:, :, list(RGB_ORDERS[fmt])])
    raise SourceError(unknown_format(fmt))


def i420_to_rgb(array: np.ndarray, width: int) -> np.ndarray:
    """picamera2's YUV420 array (h*3/2, stride) -> HxWx3 RGB, padding cropped, C-contiguous."""
    if array.ndim != 2 or array.shape[0] % 3 != 0:
        raise SourceError(f"lores frame has shape {array.shape}, expected (h*3/2, stride) YUV420")
    return to_rgb(array, "YUV420", (width, array.shape[0] * 2 // 3))


def unknown_format(fmt: str, stream: str = "") -> str:
    what = f"the {stream} stream" if stream else "a stream"
    return (f"picamera2: the camera gave {what} in format {fmt!r}, which the agent cannot convert; "
            f"set source.format to one of {', '.join(FORMATS)}")


NUMPY_ABI_HINT = (
    "picamera2 cannot be imported ({cause}): apt's python3-picamera2 is built against apt's numpy "
    "and this venv has numpy {numpy} over it; keep them compatible with "
    "`pip install \"numpy<2\"` in the venv (or `pip uninstall numpy` to use apt's)"
)


def _import_picamera2() -> Any:
    """``Picamera2``, or one line naming the cause and the fix.

    Not only ImportError: in a ``--system-site-packages`` venv where pip put numpy 2 over apt's
    numpy 1.x, importing apt's picamera2 (simplejpeg, its C extensions) raises ``ValueError``
    ("numpy.dtype size changed") — picamera2 upstream issues #1088 and #1211.
    """
    try:
        from picamera2 import Picamera2  # type: ignore[import-not-found]
    except ImportError as exc:
        if exc.name in ("picamera2", "libcamera"):
            raise SourceError(INSTALL_HINT) from None
        raise SourceError(f"picamera2 cannot be imported: {_one_line(exc)} (missing module "
                          f"{exc.name!r}: `sudo apt install python3-picamera2` brings its "
                          f"dependencies)") from None
    except Exception as exc:  # ValueError (numpy ABI), RuntimeError, OSError from C extensions
        import numpy

        if isinstance(exc, ValueError) and ("numpy" in str(exc) or "dtype" in str(exc)):
            raise SourceError(NUMPY_ABI_HINT.format(cause=_one_line(exc),
                                                    numpy=numpy.__version__)) from None
        raise SourceError(f"picamera2 cannot be imported: {type(exc).__name__}: {_one_line(exc)}") from None
    return Picamera2


def _one_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def _bt601_colour_space() -> Optional[Any]:
    try:
        from libcamera import ColorSpace  # type: ignore[import-not-found]
    except ImportError:
        return None
    return ColorSpace.Smpte170m()


def describe_cameras(cameras: List[Dict[str, Any]]) -> str:
    """``0: imx708 (id /base/...), 1: ...`` or ``none``: for one-line errors."""
    return ", ".join(f"{i}: {c.get('Model', '?')} (id {c.get('Id', '?')})"
                     for i, c in enumerate(cameras)) or "none"


def select_camera(cameras: List[Dict[str, Any]], uri: str) -> int:
    """The position in ``cameras`` (``global_camera_info()``) that ``uri`` names: "" the first,
    digits a position, else an exact ``Id``, else a ``Model`` (exact, then ignoring case)."""
    uri = uri.strip()
    if not uri or uri.isdigit():
        index = int(uri or 0)
        if index < len(cameras):
            return index
        wanted = f"camera {index}"
    else:
        for key, fold in (("Id", False), ("Model", False), ("Model", True)):
            for index, cam in enumerate(cameras):
                value = str(cam.get(key, ""))
                if value == uri or (fold and value.lower() == uri.lower()):
                    return index
        wanted = f"camera {uri!r} (no such Id or Model)"
    raise SourceError(f"picamera2: no {wanted} (source.uri); cameras libcamera sees: "
                      f"{describe_cameras(cameras)}; source.uri takes '' (the first), a number, an Id or a Model")


def _colour_space_name(colour_space: Any) -> str:
    """``<libcamera.ColorSpace 'Rec709'>`` -> ``Rec709``; "" for None."""
    if colour_space is None:
        return ""
    text = str(colour_space)
    match = re.search(r"'([^']*)'", text)
    return match.group(1) if match else text


class Picamera2Source(BaseSource):
    """``source.uri`` selects the camera: ``""`` (the first), ``"N"`` (position N in
    ``Picamera2.global_camera_info()``, as ``Picamera2(N)`` counts, not its ``Num`` field), a
    camera ``Id`` or a ``Model`` string. ``source.format`` (default YUV420) is the lores format
    asked for; whatever the camera gives back is what is converted."""

    kind = "picamera2"
    live = True  # a camera
    _enumeration_stale = False  # a camera was not found: enumerate afresh on the next open

    def __init__(self, settings: SourceSettings) -> None:
        super().__init__(settings)
        self.camera_uri = settings.uri.strip()
        fmt = (settings.format or DEFAULT_FORMAT).strip().upper()
        if fmt not in FORMATS:
            raise SourceError(f"source.format {settings.format!r} is not one picamera2 can give and the "
                              f"agent can convert; use one of {', '.join(FORMATS)}")
        self.requested_format = fmt
        self.main_size = (settings.width or DEFAULT_MAIN_SIZE[0], settings.height or DEFAULT_MAIN_SIZE[1])
        self.requested_lores = settings.lores_size or default_lores_size(
            self.main_size, settings.model_input or DEFAULT_MODEL_INPUT
        )
        if self.requested_lores[0] % 2 or self.requested_lores[1] % 2:
            raise SourceError(f"source.lores_size must be even, got {self.requested_lores}")
        self.camera_num: Optional[int] = None  # position in global_camera_info() once opened
        self.camera_info: Dict[str, Any] = {}
        self.stream = "lores"  # the stream captured ("main" if the camera gave no lores)
        self.lores_size: Optional[Tuple[int, int]] = None  # what the camera actually gave
        self.stream_format = ""
        self.stream_size: Optional[Tuple[int, int]] = None
        self._cam: Any = None
        self._job: Any = None

    def build_config(self, cam: Any) -> Dict[str, Any]:
        kwargs: Dict[str, Any] = {
            "main": {"size": self.main_size, "format": "YUV420"},
            "lores": {"size": self.requested_lores, "format": self.requested_format},
            "queue": False,
        }
        colour_space = _bt601_colour_space()
        if colour_space is not None:
            kwargs["colour_space"] = colour_space
        if self.settings.fps > 0:
            kwargs["controls"] = {"FrameRate": self.settings.fps}
        return cam.create_video_configuration(**kwargs)

    def _select(self, picamera2_cls: Any) -> int:
        """Resolve ``source.uri`` against the cameras libcamera sees now."""
        manager = getattr(picamera2_cls, "_cm", None)
        if type(self)._enumeration_stale and manager is not None and not getattr(manager, "cameras", None):
            # picamera2 keeps one libcamera CameraManager, which enumerates cameras once; with no
            # camera open in this process, a fresh one sees cameras that came up since.
            reset = getattr(manager, "reset", None)
            if callable(reset):
                reset()
        try:
            cameras = list(picamera2_cls.global_camera_info())
        except Exception as exc:
            raise SourceError(f"picamera2: cannot list cameras: {_one_line(exc)}") from None
        try:
            index = select_camera(cameras, self.camera_uri)
        except SourceError:
            type(self)._enumeration_stale = True
            raise
        type(self)._enumeration_stale = False
        self.camera_info = dict(cameras[index])
        return index

    def open(self) -> None:
        picamera2_cls = _import_picamera2()
        self.camera_num = index = self._select(picamera2_cls)
        label = f"camera {index} ({self.camera_info.get('Model', '?')}, id {self.camera_info.get('Id', '?')})"
        try:
            cam = picamera2_cls(index)
        except Exception as exc:  # IndexError, RuntimeError("Camera __init__ sequence did not complete")
            type(self)._enumeration_stale = True
            raise SourceError(f"picamera2: cannot open {label}: {_one_line(exc)}") from None
        try:
            cam.configure(self.build_config(cam))
            gave = cam.camera_config
            lores = gave.get("lores")
            self.stream = "lores" if lores else "main"
            stream = gave[self.stream]
            self.stream_format = str(stream["format"])
            self.stream_size = (int(stream["size"][0]), int(stream["size"][1]))
            self.lores_size = self.stream_size
            if self.stream_format not in FORMATS:
                raise SourceError(unknown_format(self.stream_format, self.stream))
            cam.start()
        except Exception as exc:
            try:
                cam.close()
            except Exception:
                pass
            if isinstance(exc, SourceError):
                raise
            raise SourceError(f"picamera2: cannot configure {label}: {_one_line(exc)}") from None
        self._cam = cam
        self._job = None
        log.info("picamera2: %s: %s", label, self.describe_config(gave))

    def describe_config(self, gave: Dict[str, Any]) -> str:
        """What the camera gave, and what was asked where it differs: ``main 640x480 NV12 (asked
        YUV420) stride 640, lores 320x240 NV12 (asked YUV420) stride 320, capturing lores, colour
        space Rec709 (asked Smpte170m)``."""
        asked = {"main": (self.main_size, "YUV420"), "lores": (self.requested_lores, self.requested_format)}
        parts = []
        for name in ("main", "lores"):
            stream = gave.get(name)
            if not stream:
                continue
            size = (int(stream["size"][0]), int(stream["size"][1]))
            fmt = str(stream["format"])
            asked_size, asked_fmt = asked[name]
            differs = ([f"{asked_size[0]}x{asked_size[1]}"] if tuple(asked_size) != size else []) + \
                ([asked_fmt] if asked_fmt != fmt else [])
            text = f"{name} {size[0]}x{size[1]} {fmt}"
            if differs:
                text += f" (asked {' '.join(differs)})"
            if stream.get("stride"):
                text += f" stride {stream['stride']}"
            parts.append(text)
        parts.append(f"capturing {self.stream}")
        colour = _colour_space_name(gave.get("colour_space"))
        if colour:
            wanted = _colour_space_name(_bt601_colour_space())
            parts.append(f"colour space {colour}" + (f" (asked {wanted})" if wanted and wanted != colour else ""))
        return ", ".join(parts)

    def close(self) -> None:
        cam, self._cam, self._job = self._cam, None, None
        if cam is None:
            return
        try:
            cam.stop()
        finally:
            cam.close()
            log.info("picamera2: camera %s closed", self.camera_num)

    def _read(self, timeout: float) -> Optional[np.ndarray]:
        cam = self._cam
        if cam is None or self.stream_size is None:
            raise SourceError(f"{self.name} is not open")
        array = self._capture(cam, timeout)
        if array is None:
            return None
        return to_rgb(array, self.stream_format, self.stream_size)

    def _capture(self, cam: Any, timeout: float) -> Optional[np.ndarray]:
        """Next frame of the captured stream within ``timeout``; a pending job is kept."""
        if not hasattr(cam, "wait"):  # picamera2 < 0.3.13: blocking capture only
            return cam.capture_array(self.stream)
        if self._job is None:
            self._job = cam.capture_array(self.stream, wait=False)
        try:
            array = cam.wait(self._job, timeout=timeout)
        except (TimeoutError, concurrent.futures.TimeoutError):  # distinct before 3.11
            return None
        self._job = None
        return array


BACKEND = Picamera2Source
