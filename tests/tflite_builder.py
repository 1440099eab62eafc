"""Build tiny real ``.tflite`` models in tests, without TensorFlow (not in the device venv).

Writes the TFLite schema (tensorflow/lite/schema/schema.fbs) with the ``flatbuffers`` runtime
LiteRT already depends on: tensors, constant buffers, a few builtin ops (CONV_2D, TRANSPOSE,
DEQUANTIZE, LOGISTIC, RESHAPE, RESIZE_BILINEAR) and optionally a ``TFLITE_METADATA`` entry (a minimal
metadata_schema.fbs ModelMetadata) plus the zip part that carries associated label files. The
interpreter loads and runs the result like any converted model.
"""

from __future__ import annotations

import io
import zipfile
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import flatbuffers
import numpy as np

# schema.fbs enums
TYPES = {np.dtype(np.float32): 0, np.dtype(np.int32): 2, np.dtype(np.uint8): 3, np.dtype(np.int64): 4,
         np.dtype(np.int8): 9}
OPS = {"CONV_2D": 3, "DEQUANTIZE": 6, "LOGISTIC": 14, "RESHAPE": 22, "RESIZE_BILINEAR": 23, "TRANSPOSE": 39}
CONV_2D_OPTIONS = 1  # BuiltinOptions union member


@dataclass
class T:
    """A tensor: ``data`` makes it a constant; ``scale``/``zero_point`` quantize it."""

    name: str
    shape: Sequence[int]
    dtype: type = np.float32
    data: Optional[np.ndarray] = None
    scale: Optional[float] = None
    zero_point: int = 0


@dataclass
class Op:
    name: str
    inputs: Sequence[int]
    outputs: Sequence[int]


class _B:
    def __init__(self) -> None:
        self.b = flatbuffers.Builder(1024)

    def _scalars(self, xs: Sequence, width: int, prepend) -> int:
        self.b.StartVector(width, len(xs), width)
        for x in reversed(list(xs)):
            prepend(x)
        return self.b.EndVector()

    def ints(self, xs: Sequence[int]) -> int:
        return self._scalars([int(x) for x in xs], 4, self.b.PrependInt32)

    def longs(self, xs: Sequence[int]) -> int:
        return self._scalars([int(x) for x in xs], 8, self.b.PrependInt64)

    def floats(self, xs: Sequence[float]) -> int:
        return self._scalars([float(x) for x in xs], 4, self.b.PrependFloat32)

    def tables(self, offsets: Sequence[int]) -> int:
        self.b.StartVector(4, len(offsets), 4)
        for o in reversed(list(offsets)):
            self.b.PrependUOffsetTRelative(o)
        return self.b.EndVector()

    def raw(self, data: bytes) -> int:
        """A [ubyte] vector aligned to 16 bytes (constant tensor data)."""
        self.b.StartVector(1, len(data), 16)
        self.b.head -= len(data)
        self.b.Bytes[self.b.head:self.b.head + len(data)] = data
        return self.b.EndVector()

    def table(self, fields: Dict[int, Tuple[str, object]]) -> int:
        """fields: slot -> (kind, value); kinds: off, i8, u8, i32, u32, bool."""
        self.b.StartObject(max(fields) + 1 if fields else 0)
        for slot, (kind, value) in sorted(fields.items()):
            if kind == "off":
                self.b.PrependUOffsetTRelativeSlot(slot, value, 0)
            elif kind == "i8":
                self.b.PrependInt8Slot(slot, value, -1)  # force-write (no default elision)
            elif kind == "u8":
                self.b.PrependUint8Slot(slot, value, 255)
            elif kind == "i32":
                self.b.PrependInt32Slot(slot, value, -1)
            elif kind == "u32":
                self.b.PrependUint32Slot(slot, value, 0xFFFFFFFF)
            elif kind == "bool":
                self.b.PrependBoolSlot(slot, value, not value)
        return self.b.EndObject()


def build_model(tensors: Sequence[T], ops: Sequence[Op], inputs: Sequence[int], outputs: Sequence[int],
                metadata: Optional[bytes] = None, files: Optional[Dict[str, bytes]] = None) -> bytes:
    """Serialize one subgraph; ``metadata`` becomes the TFLITE_METADATA buffer, ``files`` its zip part."""
    fb = _B()
    b = fb.b
    buffers = [fb.table({})]  # buffer 0: the empty sentinel
    tensor_offsets = []
    for t in tensors:
        buffer_index = 0
        if t.data is not None:
            buffers.append(fb.table({0: ("off", fb.raw(np.ascontiguousarray(t.data, t.dtype).tobytes()))}))
            buffer_index = len(buffers) - 1
        quant = None
        if t.scale is not None:
            quant = fb.table({2: ("off", fb.floats([t.scale])), 3: ("off", fb.longs([t.zero_point]))})
        name = b.CreateString(t.name)
        shape = fb.ints(t.shape)
        fields: Dict[int, Tuple[str, object]] = {0: ("off", shape), 1: ("i8", TYPES[np.dtype(t.dtype)]),
                                                  2: ("u32", buffer_index), 3: ("off", name)}
        if quant is not None:
            fields[4] = ("off", quant)
        tensor_offsets.append(fb.table(fields))
    names = sorted({op.name for op in ops}, key=lambda n: OPS[n])
    codes = [fb.table({0: ("i8", OPS[n]), 2: ("i32", 1), 3: ("i32", OPS[n])}) for n in names]
    op_offsets = []
    for op in ops:
        fields = {0: ("u32", names.index(op.name)), 1: ("off", fb.ints(op.inputs)), 2: ("off", fb.ints(op.outputs))}
        if op.name == "CONV_2D":  # padding VALID, stride 1x1, no activation
            options = fb.table({0: ("i8", 1), 1: ("i32", 1), 2: ("i32", 1), 3: ("i8", 0)})
            fields.update({3: ("u8", CONV_2D_OPTIONS), 4: ("off", options)})
        op_offsets.append(fb.table(fields))
    subgraph = fb.table({0: ("off", fb.tables(tensor_offsets)), 1: ("off", fb.ints(inputs)),
                         2: ("off", fb.ints(outputs)), 3: ("off", fb.tables(op_offsets)),
                         4: ("off", b.CreateString("main"))})
    metadata_entries = []
    if metadata is not None:
        buffers.append(fb.table({0: ("off", fb.raw(metadata))}))
        metadata_entries.append(fb.table({0: ("off", b.CreateString("TFLITE_METADATA")),
                                          1: ("u32", len(buffers) - 1)}))
    model_fields = {0: ("u32", 3), 1: ("off", fb.tables(codes)), 2: ("off", fb.tables([subgraph])),
                    3: ("off", b.CreateString("edge-agent test model")), 4: ("off", fb.tables(buffers))}
    if metadata_entries:
        model_fields[6] = ("off", fb.tables(metadata_entries))
    b.Finish(fb.table(model_fields), file_identifier=b"TFL3")
    data = bytes(b.Output())
    if files:
        out = io.BytesIO()
        out.write(data)
        with zipfile.ZipFile(out, "a") as z:  # appended like the TFLite metadata populator does
            for name, content in files.items():
                z.writestr(name, content)
        data = out.getvalue()
    return data


def build_metadata(mean: Sequence[float] = (), std: Sequence[float] = (), label_file: str = "",
                   description: str = "", dimension_names: Sequence[str] = ()) -> bytes:
    """A minimal ModelMetadata (metadata_schema.fbs): input normalisation, output label file."""
    fb = _B()
    b = fb.b
    units = []
    if mean:
        norm = fb.table({0: ("off", fb.floats(mean)), 1: ("off", fb.floats(std))})
        units.append(fb.table({0: ("u8", 1), 1: ("off", norm)}))  # ProcessUnit{NormalizationOptions}
    in_fields: Dict[int, Tuple[str, object]] = {0: ("off", b.CreateString("image"))}
    if units:
        in_fields[4] = ("off", fb.tables(units))
    tensor_in = fb.table(in_fields)
    out_fields: Dict[int, Tuple[str, object]] = {0: ("off", b.CreateString("scores"))}
    if label_file:
        f = fb.table({0: ("off", b.CreateString(label_file)), 2: ("i8", 2)})  # TENSOR_AXIS_LABELS
        out_fields[6] = ("off", fb.tables([f]))
    if dimension_names:
        offs = [b.CreateString(n) for n in dimension_names]
        out_fields[2] = ("off", fb.tables(offs))
    tensor_out = fb.table(out_fields)
    subgraph = fb.table({2: ("off", fb.tables([tensor_in])), 3: ("off", fb.tables([tensor_out]))})
    root = fb.table({0: ("off", b.CreateString("test model")), 1: ("off", b.CreateString(description)),
                     3: ("off", fb.tables([subgraph]))})
    b.Finish(root, file_identifier=b"M001")
    return bytes(b.Output())


# -- the models the tests use -------------------------------------------------------------------

def conv_model(size: int, weights: np.ndarray, nchw: bool = False, input_dtype=np.float32,
               input_scale: Optional[float] = None, input_zero_point: int = 0, logistic: bool = False,
               both: bool = False, **kwargs) -> bytes:
    """Input [1, size, size, 3] -> 1x1 CONV_2D with ``weights`` (C x 3) -> [1, H, W, C]
    (-> TRANSPOSE to [1, C, H, W] when ``nchw``; -> LOGISTIC when ``logistic``; ``both``: output
    the NHWC scores and their NCHW transpose)."""
    c = weights.shape[0]
    tensors: List[T] = [T("image", [1, size, size, 3], input_dtype, scale=input_scale, zero_point=input_zero_point)]
    ops: List[Op] = []
    x = 0
    if input_dtype != np.float32:
        tensors.append(T("dequantized", [1, size, size, 3]))
        ops.append(Op("DEQUANTIZE", [0], [1]))
        x = 1
    tensors += [T("w", [c, 1, 1, 3], data=weights.reshape(c, 1, 1, 3).astype(np.float32)),
                T("b", [c], data=np.zeros(c, np.float32)),
                T("scores", [1, size, size, c])]
    w, bias, y = len(tensors) - 3, len(tensors) - 2, len(tensors) - 1
    ops.append(Op("CONV_2D", [x, w, bias], [y]))
    if logistic:
        tensors.append(T("probability", [1, size, size, c]))
        ops.append(Op("LOGISTIC", [y], [len(tensors) - 1]))
        y = len(tensors) - 1
    outputs = [y]
    if nchw or both:
        tensors += [T("perm", [4], np.int32, data=np.array([0, 3, 1, 2], np.int32)),
                    T("scores_nchw", [1, c, size, size])]
        ops.append(Op("TRANSPOSE", [y, len(tensors) - 2], [len(tensors) - 1]))
        outputs = [y, len(tensors) - 1] if both else [len(tensors) - 1]
    return build_model(tensors, ops, [0], outputs, **kwargs)


def upscale_model(size: int, factor: int = 2) -> bytes:
    """Image to image: [1, size, size, 3] -> RESIZE_BILINEAR -> [1, size*factor, size*factor, 3]."""
    big = size * factor
    tensors = [T("image", [1, size, size, 3]), T("size", [2], np.int32, data=np.array([big, big], np.int32)),
               T("upscaled", [1, big, big, 3])]
    return build_model(tensors, [Op("RESIZE_BILINEAR", [0, 1], [2])], [0], [2])


def pose_like_model(size: int = 16, heatmaps: int = 39) -> bytes:
    """Like MediaPipe's pose_landmark_full (no metadata): a [1, size, size, 1] segmentation map
    ("Identity_2", a 1x1 conv) beside [1, 4, 4, heatmaps] keypoint heatmaps ("Identity_3", a
    (size-3)x(size-3) VALID conv) — two outputs that could each be read as a segmentation."""
    rng = np.random.default_rng(7)
    k = size - 3
    tensors = [T("image", [1, size, size, 3]),
               T("w_seg", [1, 1, 1, 3], data=np.array([1.0, -1.0, 0.0], np.float32).reshape(1, 1, 1, 3)),
               T("b_seg", [1], data=np.zeros(1, np.float32)),
               T("Identity_2", [1, size, size, 1]),
               T("w_heat", [heatmaps, k, k, 3], data=rng.standard_normal((heatmaps, k, k, 3)).astype(np.float32)),
               T("b_heat", [heatmaps], data=np.zeros(heatmaps, np.float32)),
               T("Identity_3", [1, 4, 4, heatmaps])]
    ops = [Op("CONV_2D", [0, 1, 2], [3]), Op("CONV_2D", [0, 4, 5], [6])]
    return build_model(tensors, ops, [0], [3, 6])


def detector_like_model(size: int = 16, anchors: int = 896, values: int = 16) -> bytes:
    """Like a face/palm detector: [1, anchors, values] regressions (1x1 conv, RESHAPE)."""
    c = anchors * values // (size * size)
    assert c * size * size == anchors * values
    tensors = [T("image", [1, size, size, 3]),
               T("w", [c, 1, 1, 3], data=np.ones((c, 1, 1, 3), np.float32)),
               T("b", [c], data=np.zeros(c, np.float32)),
               T("features", [1, size, size, c]),
               T("shape", [3], np.int32, data=np.array([1, anchors, values], np.int32)),
               T("regressors", [1, anchors, values])]
    ops = [Op("CONV_2D", [0, 1, 2], [3]), Op("RESHAPE", [3, 4], [5])]
    return build_model(tensors, ops, [0], [5])
