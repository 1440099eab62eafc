"""Encode what the agent publishes: mask palette PNG, result JSON, overlay JPEG.

Pure functions (rate limits: ``output/throttle.py``); the MQTT connection itself lives in ``comms/mqtt.py``.
"""

from __future__ import annotations

import json
import struct
import zlib
from typing import Any, Dict, Optional

import cv2
import numpy as np

from edge_agent.errors import EdgeAgentError
from edge_agent.inference.labels import pascal_colormap
from edge_agent.output import png
from edge_agent.output.png import PNG_SIGNATURE


# Class-id masks are long runs of a few values: no PNG row filter + zlib's RLE strategy is ~4x
# faster than OpenCV's default (all filters, default strategy) and ~2x smaller at every level
# 1-9 (513x289 mask: 0.17 ms / 1.6 kB vs 0.70 ms / 2.9 kB; 1080p: 2.9 ms / 7.8 kB vs 15 ms /
# 15 kB; measured by bench/perf.py). Older OpenCV (< 4.10) has no filter flag: strategy only.
# Masks are written by ``encode_mask_png`` below with the same tuning (filter none, Z_RLE); these
# OpenCV parameters remain for images that OpenCV writes and for the benchmark's comparison.
_PNG_TUNING = tuple(
    value
    for name, flag in (("IMWRITE_PNG_FILTER", "IMWRITE_PNG_FILTER_NONE"),
                       ("IMWRITE_PNG_STRATEGY", "IMWRITE_PNG_STRATEGY_RLE"))
    if hasattr(cv2, name) and hasattr(cv2, flag)
    for value in (getattr(cv2, name), getattr(cv2, flag))
)

# The frame label of binary payloads (docs/asyncapi.yaml, "Frame labels"): the JSON text
# {"seq": N[, "camera": C]} in a PNG tEXt chunk with this keyword / a JPEG COM segment starting so.
LABEL_KEY = b"edge-agent-frame"
_COLOR_GREY, _COLOR_PALETTE = 0, 3


def png_params(compression: int = 1, tuned: bool = True) -> list:
    """cv2.imencode parameters for a mask PNG (``tuned=False``: OpenCV's defaults, for benchmarks)."""
    params = [cv2.IMWRITE_PNG_COMPRESSION, int(compression)]
    return params + list(_PNG_TUNING) if tuned else params


def encode_mask_png(mask: np.ndarray, compression: int = 1, palette: Optional[np.ndarray] = None,
                    coloured: bool = True, label: Optional[bytes] = None) -> bytes:
    """A palette PNG whose pixel values ARE the class ids (lossless) and whose palette colours them.

    Viewers show a coloured picture; palette-aware decoders (PIL, libpng, browsers' canvas
    ``getImageData`` does not: it sees colours) read the ids. OpenCV expands palettes to BGR, so
    read masks with :func:`decode_mask_png`. ``palette``: Nx3 uint8 RGB, entry i colours class i
    (default: the PASCAL VOC colormap); the PLTE chunk holds ``max(id) + 1`` entries, so a
    21-class mask carries 63 bytes of palette. Written here, not with cv2.imencode (which cannot
    write palette PNGs): rows unfiltered + zlib Z_RLE, the tuning above. ``coloured=False`` writes the
    same ids as an 8-bit grey PNG (``publish.mask_format = "grey"``, for consumers decoding with OpenCV).
    ``label``: the frame label (:func:`frame_label`), written as a ``tEXt`` chunk right after IHDR.
    """
    if mask.dtype != np.uint8 or mask.ndim != 2 or mask.size == 0:
        raise ValueError(f"a mask is a non-empty HxW uint8 array, got {mask.dtype} {mask.shape}")
    colors = pascal_colormap() if palette is None else np.asarray(palette, dtype=np.uint8).reshape(-1, 3)
    entries = int(mask.max()) + 1
    if coloured and entries > len(colors):
        raise ValueError(f"class id {entries - 1} has no palette colour ({len(colors)} colours)")
    h, w = mask.shape
    rows = np.zeros((h, w + 1), np.uint8)  # each row: filter byte 0 (none) + the ids
    rows[:, 1:] = mask
    packer = zlib.compressobj(int(compression), zlib.DEFLATED, 15, 8, zlib.Z_RLE)
    idat = packer.compress(rows.data) + packer.flush()
    header = struct.pack(">IIBBBBB", w, h, 8, _COLOR_PALETTE if coloured else _COLOR_GREY, 0, 0, 0)
    plte = [png.chunk(b"PLTE", colors[:entries].tobytes())] if coloured else []
    text = [png.text_chunk(LABEL_KEY, label)] if label else []
    return b"".join((PNG_SIGNATURE, png.chunk(b"IHDR", header), *text, *plte,
                     png.chunk(b"IDAT", idat), png.chunk(b"IEND", b"")))


def png_palette(data: bytes) -> Optional[np.ndarray]:
    """The PLTE entries of a PNG as Nx3 uint8 RGB, None when it has none."""
    for kind, body in png.chunks(data):
        if kind == b"PLTE":
            return np.frombuffer(body, np.uint8).reshape(-1, 3)
    return None


def decode_mask_png(data: bytes) -> np.ndarray:
    """HxW uint8 class ids from a mask PNG: palette (index = class id) or 8-bit grey (older agents).

    A palette mask without row filters (what :func:`encode_mask_png` writes) is inflated
    directly; any other palette PNG is decoded by OpenCV (to colours) and mapped back through
    its palette, refused if two entries share a colour (the ids would be ambiguous).
    """
    try:
        chunks = list(png.chunks(data))
        ihdr = dict(chunks).get(b"IHDR", b"")
        w, h, depth, ctype, _, _, interlace = struct.unpack(">IIBBBBB", ihdr)
    except (ValueError, struct.error) as exc:
        raise ValueError(f"not a PNG mask: {exc}") from None
    if ctype != _COLOR_PALETTE:
        mask = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
        if mask is None or mask.ndim != 2:
            raise ValueError("not a PNG mask (expected palette or 8-bit grey)")
        return mask
    palette = dict(chunks).get(b"PLTE", b"")
    if depth == 8 and interlace == 0:
        try:
            raw = zlib.decompress(b"".join(body for kind, body in chunks if kind == b"IDAT"))
        except zlib.error as exc:
            raise ValueError(f"corrupt PNG mask: {exc}") from None
        if len(raw) == h * (w + 1):
            rows = np.frombuffer(raw, np.uint8).reshape(h, w + 1)
            if not rows[:, 0].any():  # no row filters: the bytes are the ids
                return rows[:, 1:].copy()
    return _ids_from_colors(data, np.frombuffer(palette, np.uint8).reshape(-1, 3))


def _ids_from_colors(data: bytes, palette: np.ndarray) -> np.ndarray:
    bgr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    if bgr is None:
        raise ValueError("not a PNG mask: OpenCV cannot decode it")
    keys = palette.astype(np.uint32) @ np.array([1 << 16, 1 << 8, 1], np.uint32)
    if len(np.unique(keys)) != len(keys):
        raise ValueError("palette PNG with repeated colours: class ids are ambiguous")
    pixels = bgr[..., ::-1].astype(np.uint32) @ np.array([1 << 16, 1 << 8, 1], np.uint32)
    order = np.argsort(keys)
    idx = np.searchsorted(keys[order], pixels).clip(0, len(keys) - 1)
    if not np.array_equal(keys[order][idx], pixels):
        raise ValueError("palette PNG with colours outside its palette")
    return order[idx].astype(np.uint8)


def encode_jpeg(rgb: np.ndarray, quality: int = 80, label: Optional[bytes] = None) -> bytes:
    """A JPEG; ``label`` (:func:`frame_label`) goes into a COM segment after SOI/APP0."""
    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR),
                           [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
    if not ok:  # pragma: no cover
        raise EdgeAgentError("JPEG encoding failed")
    data = buf.tobytes()
    if not label:
        return data
    pos = 2  # after SOI; JFIF wants its APP0 first
    if data[2:4] == b"\xff\xe0":
        pos = 4 + struct.unpack(">H", data[4:6])[0]
    body = LABEL_KEY + b" " + label
    return data[:pos] + b"\xff\xfe" + struct.pack(">H", len(body) + 2) + body + data[pos:]


def frame_label(seq: int, camera: str = "") -> bytes:
    """The label of one frame's binary payloads: ``{"seq": N}`` (plus ``"camera"`` when not "")."""
    doc: Dict[str, Any] = {"seq": int(seq)}
    if camera:
        doc["camera"] = camera
    return to_json(doc)


def read_frame_label(data: bytes) -> Optional[Dict[str, Any]]:
    """The frame label of a mask PNG or overlay JPEG (``{"seq": N, ...}``), None when it has none."""
    text: Optional[bytes] = None
    try:
        if data[:8] == PNG_SIGNATURE:
            text = png.read_text(data, LABEL_KEY)
        elif data[:2] == b"\xff\xd8":
            pos = 2
            while pos + 4 <= len(data) and data[pos] == 0xFF and data[pos + 1] not in (0xDA, 0xD9):
                size = struct.unpack(">H", data[pos + 2:pos + 4])[0]
                body = data[pos + 4:pos + 2 + size]
                if data[pos + 1] == 0xFE and body.startswith(LABEL_KEY + b" "):
                    text = body[len(LABEL_KEY) + 1:]
                    break
                pos += 2 + size
        doc = json.loads(text) if text else None
    except (ValueError, struct.error):
        return None
    return doc if isinstance(doc, dict) and isinstance(doc.get("seq"), int) else None


def to_json(doc: Dict[str, Any]) -> bytes:
    return json.dumps(doc, separators=(",", ":"), allow_nan=False).encode()

