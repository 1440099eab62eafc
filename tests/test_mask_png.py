"""Masks are palette PNGs: pixel values are the class ids, the palette colours them; overlays
carry a legend and the demo names them after their source frames."""

from __future__ import annotations

import io
import subprocess
import sys
import zlib

import cv2
import numpy as np
import pytest
from PIL import Image

from edge_agent.inference.labels import pascal_colormap, read_labels
from edge_agent.inference.segmenter import Segmenter
from edge_agent.output import encode, png
from edge_agent.output.visuals import overlay, present_classes
from tests.data import DM05, IMAGES, LABELS, MODELS, rgb


@pytest.fixture(scope="module")
def real_masks():
    segmenter = Segmenter(str(DM05), labels=str(LABELS))
    out = []
    for name in ("cat_1080p.jpg", "pets.jpg", "bird.bmp"):
        result = segmenter.segment(rgb(IMAGES / name))
        out += [np.ascontiguousarray(result.model_mask), np.ascontiguousarray(result.mask)]
    return out


def masks(real):
    noise = np.random.default_rng(7).integers(0, 21, (97, 131), dtype=np.uint8)
    return [*real, noise, np.zeros((5, 3), np.uint8), np.full((1, 1), 20, np.uint8)]


def test_palette_png_decodes_to_the_same_ids_with_pil_and_the_agents_decoder(real_masks):
    for mask in masks(real_masks):
        for level in (0, 1, 9):
            data = encode.encode_mask_png(mask, level)
            pil = Image.open(io.BytesIO(data))
            assert pil.mode == "P"
            np.testing.assert_array_equal(np.array(pil), mask)
            np.testing.assert_array_equal(encode.decode_mask_png(data), mask)


def test_viewers_see_the_classes_in_pascal_colours(real_masks):
    """OpenCV (like any viewer) expands the palette: every pixel shows its class's colour."""
    for mask in masks(real_masks):
        data = encode.encode_mask_png(mask)
        palette = encode.png_palette(data)
        assert palette is not None and len(palette) == int(mask.max()) + 1  # 3 bytes a class present
        np.testing.assert_array_equal(palette, pascal_colormap()[:len(palette)])
        shown = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
        assert shown.shape == (*mask.shape, 3)
        np.testing.assert_array_equal(shown[..., ::-1], pascal_colormap()[mask])
        as_rgb = np.array(Image.open(io.BytesIO(data)).convert("RGB"))
        np.testing.assert_array_equal(as_rgb, pascal_colormap()[mask])


def test_the_png_structure_is_valid_for_strict_readers(real_masks):
    """Chunk CRCs, IHDR fields and the zlib stream checked byte by byte (libpng-strict)."""
    data = encode.encode_mask_png(real_masks[0])
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    chunks = list(png.chunks(data))
    assert [k for k, _ in chunks] == [b"IHDR", b"PLTE", b"IDAT", b"IEND"]
    pos = 8
    for kind, body in chunks:
        crc = int.from_bytes(data[pos + 8 + len(body):pos + 12 + len(body)], "big")
        assert crc == zlib.crc32(kind + body)
        pos += 12 + len(body)
    assert pos == len(data)
    h, w = real_masks[0].shape
    assert chunks[0][1] == w.to_bytes(4, "big") + h.to_bytes(4, "big") + bytes([8, 3, 0, 0, 0])


def test_other_palette_and_grey_masks_still_decode(real_masks):
    mask = real_masks[0]
    # A palette PNG written by another encoder (PIL, with row filters): mapped back by colour.
    pil = Image.fromarray(mask, mode="P")
    pil.putpalette(pascal_colormap()[:21].ravel().tolist())
    buf = io.BytesIO()
    pil.save(buf, format="PNG", optimize=True)
    np.testing.assert_array_equal(encode.decode_mask_png(buf.getvalue()), mask)
    # The grey masks older agents published.
    grey = cv2.imencode(".png", mask)[1].tobytes()
    np.testing.assert_array_equal(encode.decode_mask_png(grey), mask)


def test_bad_masks_and_palettes_are_refused():
    with pytest.raises(ValueError, match="no palette colour"):
        encode.encode_mask_png(np.full((2, 2), 5, np.uint8), palette=np.zeros((3, 3), np.uint8))
    with pytest.raises(ValueError, match="HxW uint8"):
        encode.encode_mask_png(np.zeros((2, 2), np.int32))
    ambiguous = Image.fromarray(np.array([[0, 1]], np.uint8), mode="P")
    ambiguous.putpalette([0, 0, 0, 0, 0, 0])
    ambiguous.info.pop("transparency", None)
    buf = io.BytesIO()
    ambiguous.save(buf, format="PNG", optimize=False, bits=8)
    with pytest.raises(ValueError, match="ambiguous"):
        encode.decode_mask_png(buf.getvalue())
    with pytest.raises(ValueError, match="not a PNG"):
        encode.decode_mask_png(b"GIF89a....")


def test_overlay_legend_lists_the_classes_present():
    frame = rgb(IMAGES / "cat_720p.jpg")
    segmenter = Segmenter(str(DM05), labels=str(LABELS))
    mask = segmenter.segment(frame).mask
    assert present_classes(mask)[:2] == [0, 8]  # background, cat: most pixels first
    with_legend = overlay(frame, mask, labels=segmenter.labels)
    plain = overlay(frame, mask, legend=False)
    changed = np.argwhere(np.any(with_legend != plain, axis=2))
    assert len(changed) > 500
    assert changed[:, 0].max() < 120 and changed[:, 1].max() < 400  # a box in the top-left corner
    # The cat's colour swatch is drawn in the legend.
    cat_colour = pascal_colormap()[8]
    assert np.any(np.all(with_legend[:120, :60] == cat_colour, axis=2))


def test_demo_names_overlays_after_their_source_frames(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    for name in ("bird.bmp", "cat_720p.jpg"):
        (images / name).symlink_to(IMAGES / name)
    (images / "broken.jpg").write_bytes(b"not a jpeg")  # skipped by the source: names stay aligned
    proc = subprocess.run(
        [sys.executable, "-m", "edge_agent", "demo", "--images", str(images), "--mirror", str(MODELS),
         "--model", "deeplabv3_mnv2_dm05_pascal_quant", "--out", str(tmp_path / "out")],
        capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == ["bird_overlay.jpg", "cat_720p_overlay.jpg"]
    cat = cv2.imread(str(out / "cat_720p_overlay.jpg"))
    assert cat.shape[:2] == (720, 1280)
    assert "cat" in read_labels(str(LABELS))


def test_grey_mask_format_is_what_opencv_reads_as_ids(real_masks):
    """``publish.mask_format = "grey"``: the same ids, no palette, for consumers decoding with OpenCV."""
    from edge_agent.config import load_config
    from edge_agent.output.stages import EncodeOptions, Masks, OutputSettings, encode as encode_stage
    from edge_agent.sources.base import Frame

    settings = OutputSettings.from_config(load_config(None, ["publish.mask_format=grey"], env={}))
    assert settings.mask_format == "grey"
    mask = real_masks[0]
    frame = Frame(image=np.zeros((*mask.shape, 3), np.uint8), seq=1, timestamp=0.0, monotonic=0.0, source="test")
    for fmt, colour_type in (("grey", 0), ("palette", 3)):
        opts = EncodeOptions(mask_format=fmt)
        messages, _ = encode_stage(frame, Masks(mask, None, {}), "0" * 64, opts, None)
        png = dict(messages)["mask"]
        assert png[25] == colour_type and (b"PLTE" in png) == (fmt == "palette")
        assert np.array_equal(encode.decode_mask_png(png), mask)
        decoded = cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_UNCHANGED)
        if fmt == "grey":
            assert np.array_equal(decoded, mask)
        else:  # OpenCV expands the palette to colours
            assert decoded.shape == (*mask.shape, 3)
