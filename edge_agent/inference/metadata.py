"""TFLite Metadata: what a model says about itself (normalisation, output meaning, label files).

A model may carry a ``TFLITE_METADATA`` entry: a FlatBuffer of the published metadata schema
(tensorflow/tflite-support ``metadata_schema.fbs``, identifier ``M001``) stored in one of the
model's buffers; the files it names (``labels.txt``...) are appended to the model as a zip archive.
``tflite-support`` reads this but is unmaintained (no wheels after Python 3.11, protobuf < 4), so
this is a small reader of the fields the agent uses, on the ``flatbuffers`` runtime that LiteRT
already depends on. Unknown or absent fields are simply not reported.
"""

from __future__ import annotations

import io
import logging
import zipfile
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

from flatbuffers import encode, number_types as N
from flatbuffers.table import Table

log = logging.getLogger(__name__)

METADATA_NAME = "TFLITE_METADATA"
# AssociatedFileType
TENSOR_AXIS_LABELS = 2
TENSOR_VALUE_LABELS = 3
# ContentProperties union / ProcessUnitOptions union members used here
FEATURE_PROPERTIES, IMAGE_PROPERTIES = 1, 2
NORMALIZATION_OPTIONS = 1


@dataclass(frozen=True)
class AssociatedFile:
    name: str
    description: str
    type: int


@dataclass(frozen=True)
class TensorMeta:
    """One input or output tensor's metadata (in the subgraph's input/output order)."""

    name: str = ""
    description: str = ""
    dimension_names: Tuple[str, ...] = ()
    content: str = ""  # "image", "feature" or ""
    mean: Tuple[float, ...] = ()
    std: Tuple[float, ...] = ()
    stats_min: Tuple[float, ...] = ()
    stats_max: Tuple[float, ...] = ()
    files: Tuple[AssociatedFile, ...] = ()

    @property
    def label_file(self) -> Optional[str]:
        """The first label file of this tensor (axis labels before value labels), by name."""
        for kind in (TENSOR_AXIS_LABELS, TENSOR_VALUE_LABELS):
            for f in self.files:
                if f.type == kind:
                    return f.name
        return None


@dataclass
class ModelMetadata:
    name: str = ""
    description: str = ""
    version: str = ""
    inputs: List[TensorMeta] = field(default_factory=list)
    outputs: List[TensorMeta] = field(default_factory=list)
    files: List[AssociatedFile] = field(default_factory=list)
    packed: Dict[str, bytes] = field(default_factory=dict)  # the zip part: file name -> bytes

    def labels(self, meta: Optional[TensorMeta]) -> Optional[List[str]]:
        """Class names of an output: its label file, else a model-level one (from the zip part)."""
        names = [meta.label_file] if meta is not None and meta.label_file else []
        names += [f.name for f in self.files if f.type in (TENSOR_AXIS_LABELS, TENSOR_VALUE_LABELS)]
        for name in names:
            if name in self.packed:
                text = self.packed[name].decode("utf-8", "replace")
                lines = [line.strip() for line in text.splitlines()]
                while lines and not lines[-1]:
                    lines.pop()
                if lines:
                    return lines
        return None


class _T:
    """A flatbuffers table with the accessors the schema needs (field i = vtable slot 4 + 2i)."""

    def __init__(self, buf: bytearray, pos: int) -> None:
        self.t = Table(buf, pos)

    def _o(self, i: int) -> int:
        return self.t.Offset(4 + 2 * i)

    def str(self, i: int) -> str:
        o = self._o(i)
        return self.t.String(o + self.t.Pos).decode("utf-8", "replace") if o else ""

    def u8(self, i: int) -> int:
        o = self._o(i)
        return self.t.Get(N.Uint8Flags, o + self.t.Pos) if o else 0

    def u32(self, i: int) -> int:
        o = self._o(i)
        return self.t.Get(N.Uint32Flags, o + self.t.Pos) if o else 0

    def table(self, i: int) -> Optional["_T"]:
        o = self._o(i)
        return _T(self.t.Bytes, self.t.Indirect(o + self.t.Pos)) if o else None

    def union(self, i: int) -> Optional["_T"]:
        o = self._o(i)
        if not o:
            return None
        return _T(self.t.Bytes, self.t.Indirect(o + self.t.Pos))

    def tables(self, i: int) -> List["_T"]:
        o = self._o(i)
        if not o:
            return []
        start, n = self.t.Vector(o), self.t.VectorLen(o)
        return [_T(self.t.Bytes, self.t.Indirect(start + 4 * k)) for k in range(n)]

    def strings(self, i: int) -> Tuple[str, ...]:
        o = self._o(i)
        if not o:
            return ()
        start, n = self.t.Vector(o), self.t.VectorLen(o)
        return tuple(self.t.String(start + 4 * k).decode("utf-8", "replace") for k in range(n))

    def floats(self, i: int) -> Tuple[float, ...]:
        o = self._o(i)
        if not o:
            return ()
        return tuple(float(v) for v in self.t.GetVectorAsNumpy(N.Float32Flags, o))

    def ints(self, i: int) -> List[int]:
        o = self._o(i)
        if not o:
            return []
        return [int(v) for v in self.t.GetVectorAsNumpy(N.Int32Flags, o)]

    def bytes(self, i: int) -> bytes:
        o = self._o(i)
        if not o:
            return b""
        start, n = self.t.Vector(o), self.t.VectorLen(o)
        return bytes(self.t.Bytes[start:start + n])


def _root(buf: bytearray) -> _T:
    return _T(buf, encode.Get(N.UOffsetTFlags.packer_type, buf, 0))


def _files(t: _T, i: int) -> Tuple[AssociatedFile, ...]:
    # AssociatedFile: name 0, description 1, type 2, locale 3, version 4
    return tuple(AssociatedFile(f.str(0), f.str(1), f.u8(2)) for f in t.tables(i))


def _tensor(t: _T) -> TensorMeta:
    # TensorMetadata: name 0, description 1, dimension_names 2, content 3, process_units 4,
    # stats 5, associated_files 6
    content = ""
    c = t.table(3)
    if c is not None:  # Content: content_properties_type 0, content_properties 1, range 2
        content = {FEATURE_PROPERTIES: "feature", IMAGE_PROPERTIES: "image"}.get(c.u8(0), "")
    mean: Tuple[float, ...] = ()
    std: Tuple[float, ...] = ()
    for unit in t.tables(4):  # ProcessUnit: options_type 0, options 1
        if unit.u8(0) == NORMALIZATION_OPTIONS:
            opts = unit.union(1)
            if opts is not None:  # NormalizationOptions: mean 0, std 1
                mean, std = opts.floats(0), opts.floats(1)
    stats_min: Tuple[float, ...] = ()
    stats_max: Tuple[float, ...] = ()
    s = t.table(5)
    if s is not None:  # Stats: max 0, min 1
        stats_max, stats_min = s.floats(0), s.floats(1)
    return TensorMeta(t.str(0), t.str(1), t.strings(2), content, mean, std, stats_min, stats_max,
                      _files(t, 6))


def parse_metadata(buf: bytes) -> ModelMetadata:
    """Parse a ``TFLITE_METADATA`` buffer (a ModelMetadata FlatBuffer)."""
    root = _root(bytearray(buf))
    # ModelMetadata: name 0, description 1, version 2, subgraph_metadata 3, author 4,
    # license 5, associated_files 6, min_parser_version 7
    md = ModelMetadata(root.str(0), root.str(1), root.str(2))
    subgraphs = root.tables(3)
    if subgraphs:  # SubGraphMetadata: name 0, description 1, inputs 2, outputs 3, files 4
        sg = subgraphs[0]
        md.inputs = [_tensor(t) for t in sg.tables(2)]
        md.outputs = [_tensor(t) for t in sg.tables(3)]
        md.files = list(_files(sg, 4))
    md.files = list(_files(root, 6)) + md.files
    return md


def metadata_buffer(model: bytes) -> Optional[bytes]:
    """The bytes of the model's ``TFLITE_METADATA`` entry, or None when it has none."""
    root = _root(bytearray(model))
    # Model: version 0, operator_codes 1, subgraphs 2, description 3, buffers 4,
    # metadata_buffer 5, metadata 6 ([Metadata{name 0, buffer 1}])
    for entry in root.tables(6):
        if entry.str(0) == METADATA_NAME:
            buffers = root.tables(4)
            index = entry.u32(1)
            if index >= len(buffers):
                raise ValueError(f"metadata buffer index {index} out of range")
            data = buffers[index].bytes(0)  # Buffer: data 0, offset 1, size 2
            if not data:
                raise ValueError("metadata buffer is empty (stored outside the flatbuffer?)")
            return data
    return None


_OP_NAMES = {14: "LOGISTIC", 25: "SOFTMAX", 56: "ARG_MAX"}


def output_producers(model: bytes) -> Dict[int, str]:
    """Tensor index -> the builtin op that writes it, for the main subgraph's outputs.

    Read from the file, because a delegate (XNNPACK is applied at allocation) replaces the ops
    the interpreter reports. Ops not named in ``_OP_NAMES`` are given as their builtin code.
    """
    try:
        root = _root(bytearray(model))
        codes = []
        for c in root.tables(1):  # OperatorCode: deprecated_builtin_code 0, custom_code 1, version 2, builtin_code 3
            o = c._o(3)
            code = max(c.u8(0), c.t.Get(N.Int32Flags, o + c.t.Pos) if o else 0)
            codes.append(c.str(1) if code == 32 else _OP_NAMES.get(code, str(code)))  # 32 = CUSTOM
        subgraphs = root.tables(2)  # SubGraph: tensors 0, inputs 1, outputs 2, operators 3
        if not subgraphs:
            return {}
        wanted = set(subgraphs[0].ints(2))
        found = {}
        for op in subgraphs[0].tables(3):  # Operator: opcode_index 0, inputs 1, outputs 2
            for t in op.ints(2):
                if t in wanted and op.u32(0) < len(codes):
                    found[t] = codes[op.u32(0)]
        return found
    except Exception:  # a model the runtime will refuse anyway; no producer knowledge
        return {}


def packed_files(model: bytes) -> Dict[str, bytes]:
    """Files appended to the model as a zip archive (associated files), by name."""
    try:
        with zipfile.ZipFile(io.BytesIO(model)) as z:
            return {i.filename: z.read(i.filename) for i in z.infolist() if i.file_size < 16 << 20}
    except (zipfile.BadZipFile, OSError, ValueError):
        return {}


def read_metadata(model: bytes) -> Tuple[Optional[ModelMetadata], Optional[str]]:
    """(metadata or None, problem or None) for a model's bytes. Never raises on a bad entry."""
    try:
        buf = metadata_buffer(model)
        if buf is None:
            return None, None
        md = parse_metadata(buf)
    except Exception as exc:  # a malformed entry is reported, not fatal: the model may still run
        return None, f"unreadable TFLite metadata ({type(exc).__name__}: {exc})"
    md.packed = packed_files(model)
    return md, None
