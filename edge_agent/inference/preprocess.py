"""Frame -> model input: letterbox (keep aspect ratio, pad bottom/right) or stretch.

Pure functions on numpy arrays. The geometry of each resize is kept in a :class:`Geometry` so that
postprocessing can crop the padding off the label map and map it back to the frame exactly.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import cv2
import numpy as np

LETTERBOX = "letterbox"
STRETCH = "stretch"
MODES = (LETTERBOX, STRETCH)


@dataclass(frozen=True)
class Geometry:
    """Where the frame landed in the model input: top-left ``scaled_h x scaled_w``, rest padding."""

    frame_h: int
    frame_w: int
    scaled_h: int
    scaled_w: int
    input_h: int
    input_w: int

    @property
    def resized(self) -> bool:
        return (self.scaled_h, self.scaled_w) != (self.frame_h, self.frame_w)

    @property
    def padded(self) -> bool:
        return (self.scaled_h, self.scaled_w) != (self.input_h, self.input_w)

    def valid_region(self, out_h: int, out_w: int) -> Tuple[int, int]:
        """Size of the un-padded region in a model output of ``out_h x out_w``.

        Outputs may be smaller than the input (output stride without upsampling): scale the
        region, rounding to the nearest pixel, never 0.
        """
        if (out_h, out_w) == (self.input_h, self.input_w):
            return self.scaled_h, self.scaled_w
        h = max(1, min(out_h, int(round(self.scaled_h * out_h / self.input_h))))
        w = max(1, min(out_w, int(round(self.scaled_w * out_w / self.input_w))))
        return h, w


# A frame that fits the input and would be enlarged by at most this much is padded, not resized.
NEAR_FIT = 0.02


def letterbox_geometry(frame_h: int, frame_w: int, input_h: int, input_w: int) -> Geometry:
    """Scale the frame so it fits in the input keeping its aspect ratio (longest side fills)."""
    if frame_h <= 0 or frame_w <= 0:
        raise ValueError(f"empty frame {frame_w}x{frame_h}")
    scale = min(input_h / frame_h, input_w / frame_w)
    if 1.0 < scale <= 1.0 + NEAR_FIT:
        # e.g. picamera2's 512x288 lores (sized for the ISP, even) into 513x513: resampling to
        # 513x289 would cost a resize and blur every pixel for a 0.2% scale change; pad instead.
        return Geometry(frame_h, frame_w, frame_h, frame_w, input_h, input_w)
    scaled_h = max(1, min(input_h, int(round(frame_h * scale))))
    scaled_w = max(1, min(input_w, int(round(frame_w * scale))))
    return Geometry(frame_h, frame_w, scaled_h, scaled_w, input_h, input_w)


def stretch_geometry(frame_h: int, frame_w: int, input_h: int, input_w: int) -> Geometry:
    return Geometry(frame_h, frame_w, input_h, input_w, input_h, input_w)


def interpolation_for(src_hw: Tuple[int, int], dst_hw: Tuple[int, int]) -> int:
    """INTER_AREA when shrinking (no aliasing on camera frames), INTER_LINEAR when enlarging."""
    shrinking = dst_hw[0] * dst_hw[1] < src_hw[0] * src_hw[1]
    return cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR


# Resize quality: "fast" halves with INTER_AREA while the frame is >= 2x the target (OpenCV's
# 2x2 box fast path, ~0.3 ms for 1080p) and finishes with INTER_LINEAR (a factor < 2, so every
# source pixel still contributes); "area" is one INTER_AREA resize at any factor (~6-11 ms from
# 1080p on this 2-core x86 machine). On the golden/VOC images the masks of the two differ in
# 0.2-0.3% of the pixels, the same as +-1 LSB of noise on the input (tests/test_perf_paths.py).
FAST = "fast"
AREA = "area"
RESIZE_QUALITIES = (FAST, AREA)
DEFAULT_RESIZE = FAST


_SCRATCH = threading.local()


def scratch(shape: Tuple[int, ...], dtype=np.uint8, tag: str = "") -> np.ndarray:
    """A per-thread work buffer of ``shape``/``dtype``, the same array on every call (no per-frame
    allocation for the letterbox halvings and the normalisation's uint8 stage). Its content is
    only valid until the same thread asks for it again: never hand it to another thread."""
    cache: Dict[tuple, np.ndarray] = getattr(_SCRATCH, "cache", None) or {}
    _SCRATCH.cache = cache
    key = (tag, tuple(shape), np.dtype(dtype).str)
    buf = cache.get(key)
    if buf is None:
        if len(cache) >= 16:  # frames of many sizes (a folder): keep the cache bounded
            cache.clear()
        buf = cache[key] = np.empty(shape, dtype)
    return buf


def _into(src: np.ndarray, dst: np.ndarray, interpolation: int) -> None:
    """cv2.resize straight into ``dst`` (a row-strided view is fine); copy only if cv2 refused."""
    out = cv2.resize(src, (dst.shape[1], dst.shape[0]), dst=dst, interpolation=interpolation)
    if out is not dst and not np.shares_memory(out, dst):  # pragma: no cover - old OpenCV
        np.copyto(dst, out)


def shrink_into(frame: np.ndarray, dst: np.ndarray, quality: str = DEFAULT_RESIZE) -> None:
    """Resize ``frame`` into ``dst`` (uint8, same channels), choosing the cheap exact-enough path."""
    dh, dw = dst.shape[:2]
    if quality == AREA or frame.shape[0] < dh or frame.shape[1] < dw:
        _into(frame, dst, interpolation_for(frame.shape[:2], (dh, dw)))
        return
    src = frame
    level = 0
    while src.shape[0] >= 2 * dh and src.shape[1] >= 2 * dw:
        half = scratch((src.shape[0] // 2, src.shape[1] // 2) + src.shape[2:], src.dtype, f"half{level}")
        _into(src, half, cv2.INTER_AREA)
        src, level = half, level + 1
    _into(src, dst, cv2.INTER_LINEAR)


def resize_into(frame: np.ndarray, canvas: np.ndarray, geometry: Geometry, pad_value,
                quality: str = DEFAULT_RESIZE) -> None:
    """Write the resized frame into the top-left of ``canvas`` and fill the rest with ``pad_value``.

    ``canvas`` is typically the interpreter's own input tensor (no extra copy). A frame already at
    the scaled size is copied, never resized. ``frame`` may be smaller than ``geometry``'s frame
    (a reduced-size decode of it): the geometry is the frame's, the pixels are resampled from
    what was decoded.
    """
    if quality not in RESIZE_QUALITIES:
        raise ValueError(f"unknown resize quality '{quality}': choose {', '.join(RESIZE_QUALITIES)}")
    sh, sw = geometry.scaled_h, geometry.scaled_w
    region = canvas[:sh, :sw]
    if frame.shape[:2] == (sh, sw):
        np.copyto(region, frame, casting="unsafe")
    elif region.dtype == frame.dtype:
        shrink_into(frame, region, quality)
    else:
        resized = scratch((sh, sw, frame.shape[2]), frame.dtype, "resized")
        shrink_into(frame, resized, quality)
        np.copyto(region, resized, casting="unsafe")
    if sh < canvas.shape[0]:
        canvas[sh:, :] = pad_value
    if sw < canvas.shape[1]:
        canvas[:sh, sw:] = pad_value


def check_frame(frame: np.ndarray) -> None:
    if not isinstance(frame, np.ndarray) or frame.ndim != 3 or frame.shape[2] != 3:
        shape = getattr(frame, "shape", None)
        raise ValueError(f"expected an HxWx3 RGB frame, got shape {shape}")
    if frame.dtype != np.uint8:
        raise ValueError(f"expected a uint8 frame, got {frame.dtype}")


def letterbox(
    frame: np.ndarray,
    size: Tuple[int, int],
    pad_value: int = 128,
    out: Optional[np.ndarray] = None,
    mode: str = LETTERBOX,
    quality: str = DEFAULT_RESIZE,
) -> Tuple[np.ndarray, Geometry]:
    """Letterbox (or stretch) an RGB uint8 frame to ``size`` = (input_h, input_w).

    Pixels stay uint8 RGB; ``pad_value`` 128 is the pixel that normalises to 0 for the DeepLab
    convention ``real = pixel / 127.5 - 1`` within one quantization step (the Coral models' zero
    point). Returns the canvas (``out`` if given) and the geometry.
    """
    check_frame(frame)
    input_h, input_w = int(size[0]), int(size[1])
    geometry = make_geometry(frame.shape[0], frame.shape[1], input_h, input_w, mode)
    canvas = out if out is not None else np.empty((input_h, input_w, 3), np.uint8)
    resize_into(frame, canvas, geometry, pad_value, quality)
    return canvas, geometry


def make_geometry(frame_h: int, frame_w: int, input_h: int, input_w: int, mode: str) -> Geometry:
    if mode == LETTERBOX:
        return letterbox_geometry(frame_h, frame_w, input_h, input_w)
    if mode == STRETCH:
        return stretch_geometry(frame_h, frame_w, input_h, input_w)
    raise ValueError(f"unknown preprocess mode '{mode}': choose {', '.join(MODES)}")


# -- input normalisation: real = (pixel - mean) / std, per channel (R, G, B) --------------------

@dataclass(frozen=True)
class Normalization:
    """How pixels become the model's real-valued input, and where that rule came from."""

    mean: Tuple[float, float, float]
    std: Tuple[float, float, float]
    source: str = "default"

    @classmethod
    def of(cls, mean, std, source: str) -> "Normalization":
        """Build from 1 or 3 values each (one value applies to every channel, as in TFLite)."""
        m, s = _per_channel(mean, "mean"), _per_channel(std, "std")
        if any(v == 0 for v in s):
            raise ValueError("std must not be 0")
        return cls(m, s, source)

    def real_range(self) -> Tuple[float, float]:
        """The real values pixels 0..255 map to (over all channels)."""
        lo = [(0 - m) / s for m, s in zip(self.mean, self.std)]
        hi = [(255 - m) / s for m, s in zip(self.mean, self.std)]
        return min(min(lo), min(hi)), max(max(lo), max(hi))

    def same_as(self, other: "Normalization") -> bool:
        return all(abs(a - b) <= 1e-3 * max(1.0, abs(b)) for a, b in
                   zip(self.mean + self.std, other.mean + other.std))

    @property
    def preset(self) -> Optional[str]:
        for name, (mean, std) in PRESETS.items():
            if self.same_as(Normalization.of(mean, std, "")):
                return name
        return None

    def describe(self) -> str:
        def fmt(values):
            return f"{values[0]:g}" if len(set(values)) == 1 else "[" + ", ".join(f"{v:g}" for v in values) + "]"
        name = self.preset
        rule = f"mean {fmt(self.mean)} std {fmt(self.std)}"
        return f"{name} ({rule}) from {self.source}" if name else f"{rule} from {self.source}"

    def to_dict(self) -> dict:
        return {"preset": self.preset, "mean": list(self.mean), "std": list(self.std), "source": self.source}


def _per_channel(values, what: str) -> Tuple[float, float, float]:
    vals = [float(v) for v in (values if isinstance(values, (list, tuple)) else [values])]
    if len(vals) == 1:
        vals *= 3
    if len(vals) != 3:
        raise ValueError(f"{what} needs 1 or 3 values (R, G, B), got {len(vals)}")
    return vals[0], vals[1], vals[2]


# Named presets: the range pixels 0..255 are mapped to.
PRESETS = {"-1..1": (127.5, 127.5), "0..1": (0.0, 255.0), "raw": (0.0, 1.0)}
DEEPLAB = Normalization.of(127.5, 127.5, "default (the DeepLab convention; no metadata or setting)")


def normalize_into(pixels: np.ndarray, out: np.ndarray, norm: Normalization) -> None:
    """Float input: ``out = (pixels - mean) / std`` per channel, written into ``out``."""
    scale = np.asarray([1.0 / s for s in norm.std], np.float32)
    offset = np.asarray([m / s for m, s in zip(norm.mean, norm.std)], np.float32)
    if len(set(norm.mean)) == 1 and len(set(norm.std)) == 1:
        scale, offset = scale[0], offset[0]
    np.multiply(pixels, scale, out=out, casting="unsafe")
    out -= offset
