"""Image files: listing a folder or glob, decoding to RGB uint8 (one place for every reader)."""

from __future__ import annotations

import glob
import os
from typing import List, Optional

import cv2
import numpy as np

from edge_agent.errors import EdgeAgentError, SourceError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp")


def list_images(uri: str) -> List[str]:
    """A directory -> its images (by extension, case-insensitive), else ``uri`` as a glob."""
    if not uri:
        raise SourceError("folder source needs source.uri (a directory or a glob pattern)")
    path = os.path.expanduser(uri)
    if os.path.isdir(path):
        names = [
            os.path.join(path, n)
            for n in os.listdir(path)
            if n.lower().endswith(IMAGE_EXTENSIONS)
        ]
    else:
        names = glob.glob(path)
    return sorted(p for p in names if os.path.isfile(p))


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
