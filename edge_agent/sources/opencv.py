"""OpenCV ``VideoCapture``: USB/V4L2 cameras, video files, RTSP/HTTP streams.

Two read paths, because the two kinds of input want opposite things:

* live inputs (device index, ``/dev/videoN``, ``rtsp://``/``http://`` URLs) are drained by a
  grabber thread that keeps only the newest frame. The pipeline always gets the freshest image
  (no latency from a queue of old frames), ``read(timeout)`` can honour its timeout even when
  ``VideoCapture.read`` blocks on a dead RTSP server, and a grab failure (camera unplugged,
  stream dropped) surfaces as a ``SourceError`` so the reopen wrapper takes over.
* files are decoded synchronously in ``read``, paced at ``fps`` when it is > 0; at the end of
  the file the capture is reopened from the path (not seeked), so a file deleted mid-run is
  noticed at the next loop and a loop does not depend on the container being seekable.

MJPEG (MJPG video files, USB cameras streaming MJPG) is read as compressed packets when the
backend can hand them out (FFmpeg: ``CAP_PROP_FORMAT = -1``; V4L2: ``CAP_PROP_CONVERT_RGB = 0``)
and decoded here with libjpeg's DCT scaling down to the pipeline's ``DecodeHint``
(``images.decode_rgb``), straight to RGB. A live camera's grabber then only queues packets: the
frames the pipeline drops are never decoded. A backend that ignores the request returns BGR
images as before (:func:`to_rgb` tells them apart).
"""

from __future__ import annotations

import logging
import os
import re
import threading
import time
from typing import List, Optional, Tuple, Union

import cv2
import numpy as np

from edge_agent.config import mask_url_secrets
from edge_agent.errors import SourceError
from edge_agent.sources.images import decode_rgb
from edge_agent.sources.base import (
    BaseSource,
    Captured,
    EndOfStream,
    Pacer,
    SourceSettings,
)

log = logging.getLogger(__name__)

NETWORK_TIMEOUT_MS = 10000
_DEVICE_RE = re.compile(r"^/dev/video\d+$")


def classify(uri: str) -> Tuple[str, Union[int, str]]:
    """-> ("device", index | path) | ("stream", url) | ("file", path)."""
    uri = uri.strip()
    if not uri:
        raise SourceError("opencv source needs source.uri (device index, /dev/videoN, file or URL)")
    if uri.isdigit():
        return "device", int(uri)
    if _DEVICE_RE.match(uri):
        return "device", uri
    if "://" in uri:
        return "stream", uri
    return "file", os.path.expanduser(uri)


def _capture(kind: str, target: Union[int, str]) -> "cv2.VideoCapture":
    """Create the VideoCapture with the backend and timeouts that suit the input kind."""
    if kind == "stream":
        params: List[int] = []
        for prop in ("CAP_PROP_OPEN_TIMEOUT_MSEC", "CAP_PROP_READ_TIMEOUT_MSEC"):
            if hasattr(cv2, prop):
                params += [getattr(cv2, prop), NETWORK_TIMEOUT_MS]
        return cv2.VideoCapture(target, cv2.CAP_FFMPEG, params)
    if kind == "device" and isinstance(target, str) and hasattr(cv2, "CAP_V4L2"):
        return cv2.VideoCapture(target, cv2.CAP_V4L2)
    return cv2.VideoCapture(target)


def bgr_to_rgb(bgr: np.ndarray) -> np.ndarray:
    if bgr.ndim == 2:
        return cv2.cvtColor(bgr, cv2.COLOR_GRAY2RGB)
    if bgr.shape[2] == 4:
        return cv2.cvtColor(bgr, cv2.COLOR_BGRA2RGB)
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


_MJPG = cv2.VideoWriter_fourcc(*"MJPG")


def is_mjpeg(cap: "cv2.VideoCapture") -> bool:
    return int(cap.get(cv2.CAP_PROP_FOURCC)) & 0xFFFFFFFF == _MJPG


def request_packets(cap: "cv2.VideoCapture", kind: str) -> bool:
    """Ask an MJPEG capture for compressed packets instead of decoded BGR; True if accepted."""
    if not is_mjpeg(cap):
        return False
    try:
        if kind == "device":
            return bool(cap.set(cv2.CAP_PROP_CONVERT_RGB, 0))
        return bool(cap.set(cv2.CAP_PROP_FORMAT, -1))
    except cv2.error:
        return False


def is_packet(image: np.ndarray) -> bool:
    """A compressed packet (1xN or N bytes), not an image."""
    return image.dtype == np.uint8 and (image.ndim == 1 or (image.ndim == 2 and image.shape[0] == 1))


def to_rgb(image: np.ndarray, hint=None, packets: bool = False) -> Tuple[np.ndarray, Optional[Tuple[int, int]]]:
    """A capture's output -> (RGB image, the frame's full size): a packet is decoded (reduced to
    ``hint`` when it is a JPEG), a BGR/gray image converted. ``packets``: packets were requested,
    so a single-channel output is a raw buffer to decode, never taken for a gray image."""
    if not (is_packet(image) or (packets and image.ndim == 2)):
        return bgr_to_rgb(image), None
    rgb, size = decode_rgb(np.ascontiguousarray(image).reshape(-1), hint)
    if rgb is None:
        raise SourceError("capture returned a packet that does not decode as JPEG")
    return rgb, size


class _Grabber:
    """Owns a live VideoCapture on a daemon thread; keeps the newest frame only.

    The thread, not ``close()``, releases the capture: releasing while another thread is
    inside ``read()`` can crash some OpenCV backends, and a read stuck on a dead network stream
    must not block shutdown (the thread is a daemon; it releases when the read returns).
    """

    def __init__(self, cap: "cv2.VideoCapture", name: str) -> None:
        self._cap = cap
        self._cond = threading.Condition()
        self._latest: Optional[Captured] = None
        self._count = 0
        self._taken = 0
        self._stop = False
        self.error: Optional[str] = None
        self._thread = threading.Thread(target=self._run, name=f"grab-{name}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            while not self._stop:
                ok, bgr = self._cap.read()
                if self._stop:
                    break
                if not ok or bgr is None:
                    with self._cond:
                        self.error = "capture returned no frame (device unplugged or stream ended)"
                        self._cond.notify_all()
                    break
                item = Captured(bgr, time.time(), time.monotonic())
                with self._cond:
                    self._latest = item
                    self._count += 1
                    self._cond.notify_all()
        except Exception as exc:  # any backend failure ends this capture; the wrapper reopens
            with self._cond:
                self.error = f"capture failed: {exc}"
                self._cond.notify_all()
        finally:
            self._cap.release()

    def take(self, timeout: float) -> Optional[Captured]:
        """The newest frame not yet taken, waiting up to ``timeout``; raise if the grab died."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._count == self._taken:
                if self.error is not None:
                    raise SourceError(self.error)
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return None
                self._cond.wait(remaining)
            self._taken = self._count
            return self._latest

    def stop(self, join_s: float = 1.0) -> None:
        self._stop = True
        self._thread.join(join_s)


class OpenCVSource(BaseSource):
    kind = "opencv"
    live = True  # cameras and streams; a video file is not (live_for)

    @classmethod
    def live_for(cls, settings: SourceSettings) -> bool:
        return classify(settings.uri)[0] != "file"

    def __init__(self, settings: SourceSettings) -> None:
        super().__init__(settings)
        self.input_kind, self.target = classify(settings.uri)
        self._grabber: Optional[_Grabber] = None
        self._cap: Optional["cv2.VideoCapture"] = None
        self._pacer = Pacer(settings.fps)  # source.fps caps files and live streams alike (0 = no cap)
        self._packets = False  # the capture hands out compressed MJPEG packets

    def preflight(self) -> List[str]:
        if self.input_kind == "file" and not os.path.isfile(str(self.target)):
            return [self._missing_file()]
        return []

    def _missing_file(self) -> str:
        return f"video file {mask_url_secrets(self.settings.uri)!r} does not exist (source.uri)"

    def open(self) -> None:
        if self.live:
            cap = _capture(self.input_kind, self.target)
            if not cap.isOpened():
                cap.release()
                raise SourceError(f"cannot open {self.input_kind} {mask_url_secrets(self.target)!r}")
            self._configure_live(cap)
            self._grabber = _Grabber(cap, self.name)
        else:
            self._cap = self._open_file()

    def _configure_live(self, cap: "cv2.VideoCapture") -> None:
        s = self.settings
        if self.input_kind == "device":
            if s.width:
                cap.set(cv2.CAP_PROP_FRAME_WIDTH, s.width)
            if s.height:
                cap.set(cv2.CAP_PROP_FRAME_HEIGHT, s.height)
            if s.fps:
                cap.set(cv2.CAP_PROP_FPS, s.fps)
        # Fewest buffered frames = lowest latency; backends that cannot do it ignore it.
        cap.set(cv2.CAP_PROP_BUFFERSIZE, 1)
        if self.input_kind == "device":  # MJPG camera: decode only the frames taken, reduced
            self._packets = request_packets(cap, "device")

    def _open_file(self) -> "cv2.VideoCapture":
        path = str(self.target)
        if not os.path.isfile(path):
            raise SourceError(self._missing_file())
        cap = _capture("file", path)
        if not cap.isOpened():
            cap.release()
            raise SourceError(f"cannot decode video file {path}")
        self._packets = request_packets(cap, "file")
        return cap

    def close(self) -> None:
        if self._grabber is not None:
            self._grabber.stop()
            self._grabber = None
        if self._cap is not None:
            self._cap.release()
            self._cap = None

    def _read(self, timeout: float) -> Union[None, np.ndarray, Captured]:
        if self._grabber is not None:
            got = self._grabber.take(timeout)
            if got is None:
                return None
            rgb, size = to_rgb(got.image, self.decode_hint, self._packets)
            return Captured(rgb, got.timestamp, got.monotonic, size)
        if self._cap is None:
            raise SourceError(f"{self.name} is not open")
        if not self._pacer.wait(timeout):
            return None
        ok, bgr = self._cap.read()
        if not ok or bgr is None:
            bgr = self._rewind()
        rgb, size = to_rgb(bgr, self.decode_hint, self._packets)
        return Captured(rgb, time.time(), time.monotonic(), size)

    def _rewind(self) -> np.ndarray:
        """End of file: EndOfStream, or reopen from the path and return its first frame."""
        if self._cap is not None:
            self._cap.release()
            self._cap = None
        if not self.settings.loop:
            raise EndOfStream(self.name)
        self._cap = self._open_file()
        ok, bgr = self._cap.read()
        if not ok or bgr is None:
            raise SourceError(f"video file {self.target} has no decodable frame")
        return bgr


BACKEND = OpenCVSource
