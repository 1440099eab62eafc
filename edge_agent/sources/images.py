"""Image files: listing a folder or glob, decoding to RGB uint8 (one place for every reader).

JPEG (files and MJPEG packets) can be decoded at 1/2, 1/4 or 1/8 size by libjpeg's DCT scaling:
cheaper than a full decode and it replaces the first halvings of the letterbox resize.
:func:`decode_rgb` takes the largest factor that keeps the image at least as large as the
consumer's ``DecodeHint`` asks, so the mask geometry stays the frame's. JPEGs go through
libjpeg-turbo's TurboJPEG API (``simplejpeg``) when it is installed: the same pixels as OpenCV's
decoder for ~0.4 ms less CPU per 1080p frame; OpenCV otherwise, and for what simplejpeg refuses
(docs/performance.md, "Decode budget").
"""

from __future__ import annotations

import glob
import os
from typing import Callable, List, Optional, Tuple

import cv2
import numpy as np

from edge_agent.errors import EdgeAgentError, SourceError

try:  # optional: no wheels for armv7 (pyproject installs it where PyPI has them)
    import simplejpeg
except ImportError:  # pragma: no cover - the tflite-runtime and armv7 installs
    simplejpeg = None

# Decoding straight to RGB (OpenCV >= 4.11) saves the BGR->RGB pass; older OpenCV converts after.
_RGB = getattr(cv2, "IMREAD_COLOR_RGB", None)
# DCT scale factor -> the reduced flag without colour bits (1/2: IMREAD_REDUCED_GRAYSCALE_2 = 16).
_REDUCED = {2: cv2.IMREAD_REDUCED_GRAYSCALE_2, 4: cv2.IMREAD_REDUCED_GRAYSCALE_4,
            8: cv2.IMREAD_REDUCED_GRAYSCALE_8}
_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}  # start-of-frame markers (not DHT/JPG/DAC)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp")


def list_images(uri: str) -> List[str]:
    """A directory -> its images (by extension, case-insensitive), else ``uri`` as a glob."""
    if not uri:
        raise SourceError("folder source needs source.uri (a directory or a glob pattern)")
    path = os.path.expanduser(uri)
    if not glob.has_magic(path) and not os.path.exists(path):
        raise SourceError(f"folder {uri!r} does not exist (source.uri: a directory or a glob pattern)")
    if os.path.isdir(path):
        names = [
            os.path.join(path, n)
            for n in os.listdir(path)
            if n.lower().endswith(IMAGE_EXTENSIONS)
        ]
    else:
        names = glob.glob(path)
    return sorted(p for p in names if os.path.isfile(p))


def jpeg_size(data: np.ndarray) -> Optional[Tuple[int, int]]:
    """(h, w) from a JPEG's start-of-frame header, None when ``data`` is not a JPEG (or truncated).

    Walks the marker segments only (a few steps, microseconds): the size is needed before
    choosing the decode scale.
    """
    header = jpeg_header(data)
    return header[:2] if header else None


def _exif_orientation(buf: memoryview, start: int, end: int) -> int:
    """The EXIF orientation tag (1-8) of an APP1 segment's payload ``buf[start:end]``, 1 if none."""
    seg = bytes(buf[start:end])
    if not seg.startswith(b"Exif\0\0") or len(seg) < 14:
        return 1
    tiff = seg[6:]
    order = {b"II": "little", b"MM": "big"}.get(tiff[:2])
    if order is None:
        return 1
    ifd = int.from_bytes(tiff[4:8], order)
    if ifd + 2 > len(tiff):
        return 1
    for k in range(int.from_bytes(tiff[ifd:ifd + 2], order)):
        entry = ifd + 2 + 12 * k
        if entry + 12 > len(tiff):
            break
        if int.from_bytes(tiff[entry:entry + 2], order) == 0x0112:
            value = int.from_bytes(tiff[entry + 8:entry + 10], order)
            return value if 1 <= value <= 8 else 1
    return 1


def jpeg_header(data: np.ndarray) -> Optional[Tuple[int, int, int]]:
    """(h, w, EXIF orientation) of a JPEG (orientation 1 when it has none), None when ``data`` is
    not a JPEG (or truncated). OpenCV turns an oriented JPEG upright when it decodes it; a reduced
    decode must then come from OpenCV too, or the image would not match its size."""
    buf = memoryview(np.ascontiguousarray(data).reshape(-1))
    n = len(buf)
    if n < 4 or buf[0] != 0xFF or buf[1] != 0xD8:
        return None
    orientation = 1
    i = 2
    while i + 4 <= n:
        if buf[i] != 0xFF:
            return None
        marker = buf[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD7:  # TEM / RST: no length
            i += 2
            continue
        length = (buf[i + 2] << 8) | buf[i + 3]
        if marker == 0xE1 and orientation == 1:  # APP1: EXIF
            orientation = _exif_orientation(buf, i + 4, min(n, i + 2 + length))
        if marker in _SOF:
            if i + 9 > n:
                return None
            h = (buf[i + 5] << 8) | buf[i + 6]
            w = (buf[i + 7] << 8) | buf[i + 8]
            return (h, w, orientation) if h and w else None
        if marker == 0xDA or length < 2:  # scan started without a frame header
            return None
        i += 2 + length
    return None


# Images that arrive in commands (a deployment's sample and golden mask) are decoded only after
# their header says they fit: a 150 KB PNG can announce 12000x12000 pixels (432 MB decoded).
# 16 MP covers every camera frame the agent handles (4K is 8.3 MP) with room to spare.
MAX_IMAGE_PIXELS = 4096 * 4096
MAX_IMAGE_SIDE = 8192
IMAGE_FORMATS = "PNG, JPEG or BMP"
MAX_IMAGE_TEXT = "16 MP (4096x4096 pixels) and 8192 pixels per side"


def encoded_image_size(data: bytes) -> Optional[Tuple[int, int]]:
    """(h, w) from the header of a PNG, JPEG or BMP file, without decoding; None for anything else
    (or a header too short to tell)."""
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        if len(data) < 24 or data[12:16] != b"IHDR":
            return None
        return int.from_bytes(data[20:24], "big"), int.from_bytes(data[16:20], "big")
    if data[:2] == b"\xff\xd8":
        return jpeg_size(np.frombuffer(data, np.uint8))
    if data[:2] == b"BM" and len(data) >= 26:
        header = int.from_bytes(data[14:18], "little")
        if header == 12:  # BITMAPCOREHEADER: 16-bit sides
            return int.from_bytes(data[20:22], "little"), int.from_bytes(data[18:20], "little")
        w = int.from_bytes(data[18:22], "little", signed=True)
        h = int.from_bytes(data[22:26], "little", signed=True)
        return abs(h), abs(w)  # a negative height: stored top-down
    return None


def image_size_problem(data: bytes, what: str) -> Optional[str]:
    """Why ``data`` must not be decoded (one line naming the limit), or None: a PNG, JPEG or BMP
    whose header announces at most ``MAX_IMAGE_PIXELS`` pixels and sides of at most ``MAX_IMAGE_SIDE``."""
    size = encoded_image_size(data)
    if size is None:
        return f"{what}: not a {IMAGE_FORMATS} image (or its header is truncated)"
    h, w = size
    if not (0 < h <= MAX_IMAGE_SIDE and 0 < w <= MAX_IMAGE_SIDE) or h * w > MAX_IMAGE_PIXELS:
        return f"{what}: {w}x{h} pixels, over the limit for images in commands: {MAX_IMAGE_TEXT}"
    return None


def reduction_for(size: Tuple[int, int], needed: Tuple[int, int]) -> int:
    """The largest DCT scale factor (1, 2, 4, 8) whose decoded image (libjpeg rounds up) is still
    at least ``needed`` (h, w) on both sides."""
    h, w = size
    for factor in (8, 4, 2):
        if -(-h // factor) >= needed[0] and -(-w // factor) >= needed[1]:
            return factor
    return 1


def decode_rgb(data: np.ndarray, hint: Optional[Callable[[int, int], Tuple[int, int]]] = None
               ) -> Tuple[Optional[np.ndarray], Optional[Tuple[int, int]]]:
    """Encoded bytes -> (RGB image, the image's full size (h, w)); (None, None) if undecodable.

    With ``hint`` (a source's ``DecodeHint``) a JPEG is decoded at the largest 1/2, 1/4, 1/8 scale
    that stays at least ``hint(h, w)``; the full size is returned with it. Other formats, and
    JPEGs that cannot be reduced, decode at full size. JPEGs without an EXIF rotation decode
    through simplejpeg when it is installed (:data:`JPEG_DECODER`).
    """
    header = jpeg_header(data)
    upright = header is not None and header[2] == 1
    size = header[:2] if upright else None  # an oriented JPEG: OpenCV, full size, turned upright
    factor = reduction_for(size, hint(*size)) if size and hint is not None else 1
    if upright and simplejpeg is not None:
        image = _turbo(data, size, factor)
        if image is not None:
            return image, (size if factor > 1 else image.shape[:2])
    try:
        if factor > 1 and _RGB is not None:
            image = cv2.imdecode(data, _REDUCED[factor] | _RGB)
        elif factor > 1:
            image = cv2.imdecode(data, _REDUCED[factor] | cv2.IMREAD_COLOR)
            image = None if image is None else cv2.cvtColor(image, cv2.COLOR_BGR2RGB, dst=image)
        elif _RGB is not None:
            image = cv2.imdecode(data, _RGB)
        else:
            image = cv2.imdecode(data, cv2.IMREAD_COLOR)
            image = None if image is None else cv2.cvtColor(image, cv2.COLOR_BGR2RGB, dst=image)
    except cv2.error:
        return None, None
    if image is None:
        return None, None
    return image, (size if factor > 1 else image.shape[:2])


# Which library decodes JPEGs (info, bench): "simplejpeg" (libjpeg-turbo's TurboJPEG API) or "opencv".
JPEG_DECODER = "simplejpeg" if simplejpeg is not None else "opencv"


def _turbo(data: np.ndarray, size: Tuple[int, int], factor: int) -> Optional[np.ndarray]:
    """simplejpeg at 1/``factor`` (its smallest scale >= that size: exactly 1/factor), RGB; None
    when it refuses the data or warns (truncated: OpenCV then decides, as before). The pixels
    equal OpenCV's (the same libjpeg-turbo IDCT and upsampling), for 4.2-4.4 instead of 4.6-4.8 ms
    per 1080p frame at 1/2. The n/8 scales in between (3/8: 720x405 of 1080p) are not used: slower
    than 1/2 here (docs/performance.md)."""
    h, w = size
    try:
        return simplejpeg.decode_jpeg(np.ascontiguousarray(data).reshape(-1), colorspace="RGB",
                                      min_height=-(-h // factor), min_width=-(-w // factor),
                                      strict=True)  # warnings too: OpenCV decides, as before
    except (ValueError, TypeError):
        return None


def read_scaled(path: str, hint: Optional[Callable[[int, int], Tuple[int, int]]] = None
                ) -> Tuple[Optional[np.ndarray], Optional[Tuple[int, int]]]:
    """Read and :func:`decode_rgb` a file: (RGB image, full size), (None, None) if unreadable."""
    try:
        data = np.fromfile(path, np.uint8)
    except (OSError, ValueError):
        return None, None
    if data.size == 0:
        return None, None
    return decode_rgb(data, hint)


def read_rgb(path: str) -> Optional[np.ndarray]:
    """Decode an image file to RGB; None when it cannot be read or decoded."""
    try:
        bgr = cv2.imread(path, cv2.IMREAD_COLOR)
    except cv2.error:
        return None
    if bgr is None:
        return None
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def read_image(path: str) -> np.ndarray:
    """Like :func:`read_rgb`, but one readable error when the file is missing or not an image."""
    if not os.path.isfile(path):
        raise EdgeAgentError(f"{path}: image not found")
    image = read_rgb(path)
    if image is None:
        raise EdgeAgentError(f"{path}: not a readable image")
    return image
