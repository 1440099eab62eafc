"""Raspberry Pi camera via picamera2 (libcamera): capture the ISP-scaled ``lores`` stream.

Why lores: the model needs ~513x513, the sensor gives 1280x720 or more. The Pi's ISP can emit a
second, small stream for free; capturing that instead of the main stream saves a full-size copy
and a CPU resize per frame (the letterbox then only pads). On Pi 4 and earlier the lores stream
must be YUV420 and no larger than main, so we ask for I420 and convert with OpenCV.

Details that matter (picamera2 manual, appendix A):
* ``capture_array("lores")`` on a YUV420 stream returns shape ``(h*3/2, stride)``: the Y plane,
  then U and V planes at half stride. Converting the whole padded array and cropping the width
  afterwards is correct because the chroma planes use exactly stride/2.
* picamera2's "RGB888" is B,G,R in memory (DRM fourcc naming); we never use it, which avoids
  that trap, and the main stream (which we never capture) is YUV420 too to save bandwidth.
* OpenCV's I420 -> RGB uses BT.601 limited-range coefficients, so we request the matching
  ``Smpte170m`` colour space (the video default would be Rec709, preview sYCC full-range).
* ``queue=False``: do not hand us a frame that was completed before we asked (latency).
"""

from __future__ import annotations

import concurrent.futures
import logging
from typing import Any, Dict, Optional, Tuple

import cv2
import numpy as np

from edge_agent.errors import SourceError
from edge_agent.sources.base import BaseSource, SourceSettings

log = logging.getLogger(__name__)

DEFAULT_MAIN_SIZE = (1280, 720)  # (w, h)
DEFAULT_MODEL_INPUT = (513, 513)  # (h, w) of the shipped DeepLab models

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


def i420_to_rgb(array: np.ndarray, width: int) -> np.ndarray:
    """picamera2's YUV420 array (h*3/2, stride) -> HxWx3 RGB, padding cropped, C-contiguous."""
    if array.ndim != 2 or array.shape[0] % 3 != 0:
        raise SourceError(f"lores frame has shape {array.shape}, expected (h*3/2, stride) YUV420")
    rgb = cv2.cvtColor(np.ascontiguousarray(array), cv2.COLOR_YUV2RGB_I420)
    return np.ascontiguousarray(rgb[:, :width])


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


class Picamera2Source(BaseSource):
    kind = "picamera2"
    live = True  # a camera

    def __init__(self, settings: SourceSettings) -> None:
        super().__init__(settings)
        uri = settings.uri.strip()
        if uri and not uri.isdigit():
            raise SourceError(f"picamera2 source.uri must be a camera number (0, 1, ..), got {uri!r}")
        self.camera_num = int(uri) if uri else 0
        self.main_size = (settings.width or DEFAULT_MAIN_SIZE[0], settings.height or DEFAULT_MAIN_SIZE[1])
        self.requested_lores = settings.lores_size or default_lores_size(
            self.main_size, settings.model_input or DEFAULT_MODEL_INPUT
        )
        if self.requested_lores[0] % 2 or self.requested_lores[1] % 2:
            raise SourceError(f"source.lores_size must be even, got {self.requested_lores}")
        self.lores_size: Optional[Tuple[int, int]] = None  # what the camera actually gave
        self._cam: Any = None
        self._job: Any = None

    def build_config(self, cam: Any) -> Dict[str, Any]:
        kwargs: Dict[str, Any] = {
            "main": {"size": self.main_size, "format": "YUV420"},
            "lores": {"size": self.requested_lores, "format": "YUV420"},
            "queue": False,
        }
        colour_space = _bt601_colour_space()
        if colour_space is not None:
            kwargs["colour_space"] = colour_space
        if self.settings.fps > 0:
            kwargs["controls"] = {"FrameRate": self.settings.fps}
        return cam.create_video_configuration(**kwargs)

    def open(self) -> None:
        picamera2_cls = _import_picamera2()
        try:
            cam = picamera2_cls(self.camera_num)
        except (IndexError, RuntimeError) as exc:
            raise SourceError(f"cannot open Raspberry Pi camera {self.camera_num}: {exc}") from None
        try:
            cam.configure(self.build_config(cam))
            lores = cam.camera_config["lores"]
            self.lores_size = (int(lores["size"][0]), int(lores["size"][1]))
            cam.start()
        except Exception as exc:
            cam.close()
            raise SourceError(f"cannot configure Raspberry Pi camera {self.camera_num}: {exc}") from None
        self._cam = cam
        self._job = None
        log.info(
            "picamera2: camera %d main %dx%d, lores %dx%d YUV420",
            self.camera_num, *self.main_size, *self.lores_size,
        )

    def close(self) -> None:
        cam, self._cam, self._job = self._cam, None, None
        if cam is None:
            return
        try:
            cam.stop()
        finally:
            cam.close()

    def _read(self, timeout: float) -> Optional[np.ndarray]:
        cam = self._cam
        if cam is None or self.lores_size is None:
            raise SourceError(f"{self.name} is not open")
        array = self._capture_lores(cam, timeout)
        if array is None:
            return None
        return i420_to_rgb(array, self.lores_size[0])

    def _capture_lores(self, cam: Any, timeout: float) -> Optional[np.ndarray]:
        """Next lores frame within ``timeout``; a pending job is kept, not re-requested."""
        if not hasattr(cam, "wait"):  # picamera2 < 0.3.13: blocking capture only
            return cam.capture_array("lores")
        if self._job is None:
            self._job = cam.capture_array("lores", wait=False)
        try:
            array = cam.wait(self._job, timeout=timeout)
        except (TimeoutError, concurrent.futures.TimeoutError):  # distinct before 3.11
            return None
        self._job = None
        return array


BACKEND = Picamera2Source
