"""A moving test pattern: frames without a camera or files (demos, soak tests, CI).

Colour bars that scroll one step per frame plus a white square that walks diagonally, so a
consumer can see both that frames change and that colours survive the pipeline (R, G, B bars
are at known positions).
"""

from __future__ import annotations

import functools
from typing import Optional

import numpy as np

from edge_agent.sources.base import BaseSource, Pacer, SourceSettings

DEFAULT_SIZE = (640, 480)  # (w, h)

_BARS = np.array(
    [
        (255, 255, 255),
        (255, 255, 0),
        (0, 255, 255),
        (0, 255, 0),
        (255, 0, 255),
        (255, 0, 0),
        (0, 0, 255),
        (0, 0, 0),
    ],
    dtype=np.uint8,
)


def color_bars(width: int, height: int) -> np.ndarray:
    """Eight vertical SMPTE-like bars, HxWx3 RGB."""
    idx = (np.arange(width) * len(_BARS)) // width
    row = _BARS[idx]
    return np.ascontiguousarray(np.broadcast_to(row, (height, width, 3)))


@functools.lru_cache(maxsize=4)
def _bars(width: int, height: int) -> np.ndarray:
    """The bars of one size, built once (read-only): a frame is then one copy, not three."""
    bars = color_bars(width, height)
    bars.setflags(write=False)
    return bars


def pattern(width: int, height: int, n: int) -> np.ndarray:
    """Frame ``n`` of the pattern (a new array): bars scrolled by ``n`` * 4 px, square at a
    diagonal step."""
    img = np.roll(_bars(width, height), shift=(n * 4) % max(width, 1), axis=1)
    side = max(min(width, height) // 8, 2)
    x = (n * 5) % max(width - side, 1)
    y = (n * 3) % max(height - side, 1)
    img[y : y + side, x : x + side] = 255
    return img


class SyntheticSource(BaseSource):
    """Generates ``pattern`` frames at ``fps`` (0 = as fast as asked)."""

    kind = "synthetic"
    live = False  # a generator: every frame is processed

    def __init__(self, settings: SourceSettings) -> None:
        super().__init__(settings)
        self.width = settings.width or DEFAULT_SIZE[0]
        self.height = settings.height or DEFAULT_SIZE[1]
        self._pacer = Pacer(settings.fps)
        self._n = 0
        self._open = False

    def open(self) -> None:
        self._open = True

    def close(self) -> None:
        self._open = False

    def _read(self, timeout: float) -> Optional[np.ndarray]:
        if not self._pacer.wait(timeout):
            return None
        img = pattern(self.width, self.height, self._n)
        self._n += 1
        return img


BACKEND = SyntheticSource
