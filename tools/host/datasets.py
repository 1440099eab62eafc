"""Images and label maps for calibration, training and evaluation.

Two layouts: a plain image folder (calibration) and the PASCAL VOC layout
(``JPEGImages/``, ``SegmentationClass/`` palette PNGs with 255 = ignore,
``ImageSets/Segmentation/<split>.txt``). Model inputs are made with the agent's own
``edge_agent.inference.preprocess.letterbox`` so calibration/training see exactly what the device feeds.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, List, Optional, Sequence, Tuple

import cv2
import numpy as np

from edge_agent.errors import EdgeAgentError
from edge_agent.inference.preprocess import Geometry, letterbox

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp")
IGNORE_INDEX = 255
PAD_PIXEL = 128  # normalises to ~0 (Coral zero point): the padding the agent uses


class DatasetError(EdgeAgentError):
    """A dataset folder or file is missing, empty or unreadable."""


def read_rgb(path: "str | Path") -> np.ndarray:
    """HxWx3 uint8 RGB; DatasetError if OpenCV cannot decode it."""
    img = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if img is None:
        raise DatasetError(f"cannot read image {path}")
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


def read_label(path: "str | Path") -> np.ndarray:
    """Class-id map from a VOC palette PNG (pixel value = palette index = class id)."""
    from PIL import Image  # cv2 would expand the palette to colours

    try:
        with Image.open(path) as im:
            if im.mode not in ("P", "L"):
                raise DatasetError(f"{path}: label must be a palette or grey PNG, not {im.mode}")
            return np.array(im, dtype=np.uint8)
    except OSError as exc:
        raise DatasetError(f"cannot read label map {path}: {exc}") from None


def normalize(canvas: np.ndarray) -> np.ndarray:
    """The DeepLab float input convention: ``real = pixel / 127.5 - 1``."""
    return canvas.astype(np.float32) / 127.5 - 1.0


def model_input(image: np.ndarray, size: Tuple[int, int]) -> Tuple[np.ndarray, Geometry]:
    """Letterbox like the agent, then normalise: float32 HxWx3 in [-1, 1] and the geometry."""
    canvas, geometry = letterbox(image, size, pad_value=PAD_PIXEL)
    return normalize(canvas), geometry


def letterbox_label(label: np.ndarray, size: Tuple[int, int]) -> np.ndarray:
    """Label map placed like its image (nearest resize, padding = ignore)."""
    geometry = letterbox(np.zeros(label.shape + (3,), np.uint8), size)[1]
    out = np.full(size, IGNORE_INDEX, np.uint8)
    resized = cv2.resize(label, (geometry.scaled_w, geometry.scaled_h),
                         interpolation=cv2.INTER_NEAREST)
    out[:geometry.scaled_h, :geometry.scaled_w] = resized
    return out


def image_files(folder: "str | Path", limit: Optional[int] = None) -> List[Path]:
    """Sorted image files of a folder (recursively), at most ``limit``."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DatasetError(f"image folder not found: {folder}")
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise DatasetError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {folder}")
    return files[:limit] if limit else files


@dataclass(frozen=True)
class VocSample:
    id: str
    image_path: Path
    label_path: Path


class VocDataset:
    """A VOC-layout folder; ``split`` names ``ImageSets/Segmentation/<split>.txt``."""

    def __init__(self, root: "str | Path", split: str = "val") -> None:
        self.root = Path(root)
        list_file = self.root / "ImageSets" / "Segmentation" / f"{split}.txt"
        if not list_file.is_file():
            raise DatasetError(f"not a VOC-layout folder: {list_file} is missing")
        ids = [line.strip() for line in list_file.read_text().splitlines() if line.strip()]
        if not ids:
            raise DatasetError(f"{list_file} lists no images")
        self.samples = [self._sample(i) for i in ids]

    def _sample(self, sample_id: str) -> VocSample:
        label = self.root / "SegmentationClass" / f"{sample_id}.png"
        images = [self.root / "JPEGImages" / f"{sample_id}{s}" for s in (".jpg", ".png", ".jpeg")]
        image = next((p for p in images if p.is_file()), None)
        if image is None or not label.is_file():
            raise DatasetError(f"VOC sample {sample_id!r}: image or SegmentationClass PNG missing")
        return VocSample(sample_id, image, label)

    def __len__(self) -> int:
        return len(self.samples)

    def __iter__(self) -> Iterator[Tuple[VocSample, np.ndarray, np.ndarray]]:
        for s in self.samples:
            yield s, read_rgb(s.image_path), read_label(s.label_path)


def calibration_images(source: "str | Path", limit: int) -> List[np.ndarray]:
    """RGB images for calibration from an image folder or a VOC folder (its JPEGImages)."""
    source = Path(source)
    folder = source / "JPEGImages" if (source / "JPEGImages").is_dir() else source
    return [read_rgb(p) for p in image_files(folder, limit)]


def training_arrays(dataset: VocDataset, size: Tuple[int, int]
                    ) -> Tuple[np.ndarray, np.ndarray]:
    """All samples as (N,H,W,3) float inputs and (N,H,W) uint8 labels, letterboxed."""
    xs, ys = [], []
    for _, image, label in dataset:
        xs.append(model_input(image, size)[0])
        ys.append(letterbox_label(label, size))
    return np.stack(xs), np.stack(ys)


def batches(arrays: Sequence[np.ndarray], batch_size: int, seed: int = 0
            ) -> Iterator[Tuple[np.ndarray, ...]]:
    """Endless shuffled mini-batches with random horizontal flips (deterministic by seed)."""
    rng = np.random.default_rng(seed)
    n = len(arrays[0])
    while True:
        for start in range(0, n, batch_size):
            if start == 0:
                order = rng.permutation(n)
            idx = order[start:start + batch_size]
            flip = rng.random() < 0.5
            yield tuple(a[idx][:, :, ::-1] if flip else a[idx] for a in arrays)
