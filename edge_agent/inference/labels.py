"""Label files (one class name a line, index = class id) and the PASCAL VOC colormap."""

from __future__ import annotations

from functools import lru_cache
from typing import List, Optional, Sequence, Union

import numpy as np

from edge_agent.errors import EdgeAgentError


def read_labels(path: str) -> List[str]:
    """Read a label file: ``name`` or ``id name`` / ``id: name`` lines (Coral style).

    ``#`` lines are comments; the list ends at the first blank line after a name, so notes
    below it (Coral's PASCAL file explains the 255 ignore label there) are not taken as classes.
    """
    try:
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
    except OSError as exc:
        raise EdgeAgentError(f"{path}: cannot read labels ({exc.strerror})") from exc
    return parse_labels(text, path)


def parse_labels(text: str, what: str = "labels") -> List[str]:
    """The class names of a label file's text (rules of :func:`read_labels`); ``what`` names it in errors."""
    raw = [line.strip() for line in text.splitlines()]
    lines: List[str] = []
    for line in raw:
        if line.startswith("#"):
            continue
        if not line:
            if lines:
                break
            continue
        lines.append(line)
    if not lines:
        raise EdgeAgentError(f"{what}: label file is empty")
    numbered = [_split_numbered(line) for line in lines]
    if all(n is not None for n in numbered):
        names = {}
        for idx, name in numbered:  # type: ignore[misc]
            names[idx] = name
        return [names.get(i, str(i)) for i in range(max(names) + 1)]
    return lines


def _split_numbered(line: str):
    head, _, rest = line.replace(":", " ", 1).partition(" ")
    if head.isdigit() and rest.strip():
        return int(head), rest.strip()
    return None


@lru_cache(maxsize=1)
def pascal_colormap() -> np.ndarray:
    """The 256x3 uint8 PASCAL VOC colormap (the one DeepLab's demos use)."""
    colormap = np.zeros((256, 3), dtype=np.uint8)
    ind = np.arange(256, dtype=np.int64)
    for shift in reversed(range(8)):
        for channel in range(3):
            colormap[:, channel] |= (((ind >> channel) & 1) << shift).astype(np.uint8)
        ind >>= 3
    return colormap


def labels_for(labels: Union[str, Sequence[str], None]) -> Optional[List[str]]:
    """A label file path, an already-read list of names, or None."""
    if labels is None or labels == "":
        return None
    if isinstance(labels, str):
        return read_labels(labels)
    return [str(name) for name in labels]
