"""Read a ``.tflite`` flatbuffer: ops in execution order, tensors, dequantized constants.

Used by ``rebuild`` (weights -> Keras) and ``edgetpu_check`` (op/dtype analysis). Parsing the
flatbuffer directly (TensorFlow's generated schema) gives op options (stride, dilation, fused
activation, align_corners) that the interpreter API does not expose, and works for models whose
ops cannot run here (``edgetpu-custom-op``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np

from edge_agent.errors import ModelError

_DTYPES = {0: np.float32, 1: np.float16, 2: np.int32, 3: np.uint8, 4: np.int64, 6: np.bool_,
           7: np.int16, 9: np.int8, 10: np.float64}
ACTIVATIONS = {0: None, 1: "RELU", 2: "RELU_N1_TO_1", 3: "RELU6", 4: "TANH"}


@dataclass
class TensorInfo:
    index: int
    name: str
    shape: List[int]
    shape_signature: List[int]
    dtype: type
    scale: np.ndarray
    zero_point: np.ndarray
    quantized_dimension: int
    data: Optional[np.ndarray]  # raw constant contents (None for activations)

    @property
    def quantized(self) -> bool:
        return self.scale.size > 0 and self.dtype in (np.uint8, np.int8, np.int16, np.int32)

    @property
    def per_axis(self) -> bool:
        return self.scale.size > 1


@dataclass
class OpInfo:
    index: int
    opcode: str
    inputs: List[int]
    outputs: List[int]
    options: Dict[str, object] = field(default_factory=dict)
    custom_code: str = ""


@dataclass
class TFLiteGraph:
    path: Path
    tensors: List[TensorInfo]
    ops: List[OpInfo]
    inputs: List[int]
    outputs: List[int]

    def producer(self, tensor: int) -> Optional[OpInfo]:
        for op in self.ops:
            if tensor in op.outputs:
                return op
        return None

    def constant(self, tensor: int) -> np.ndarray:
        """Float value of a constant: ``(q - zero_point) * scale`` (per axis where present).

        Follows a DEQUANTIZE producer (float16 / int8 weight storage) to its constant input.
        """
        info = self.tensors[tensor]
        if info.data is None:
            prod = self.producer(tensor)
            if prod is not None and prod.opcode == "DEQUANTIZE":
                return self.constant(prod.inputs[0])
            raise ModelError(f"{self.path.name}: tensor {info.name!r} is not a constant")
        raw = info.data.astype(np.float32) if info.dtype != np.float32 else info.data
        if not info.quantized:
            return raw.astype(np.float32)
        shape = [1] * raw.ndim
        if info.per_axis:
            shape[info.quantized_dimension] = -1
        scale = info.scale.reshape(shape).astype(np.float64)
        zp = info.zero_point.reshape(shape).astype(np.float64)
        return ((raw.astype(np.float64) - zp) * scale).astype(np.float32)


def _names(enum_cls) -> Dict[int, str]:
    return {v: k for k, v in vars(enum_cls).items() if not k.startswith("_")}


def read_tflite(path: "str | Path") -> TFLiteGraph:
    """Parse the first subgraph of a TFLite model; ModelError if it is not one."""
    from tensorflow.lite.python import schema_py_generated as schema

    path = Path(path)
    try:
        buf = path.read_bytes()
    except OSError as exc:
        raise ModelError(f"cannot read model {path}: {exc.strerror or exc}") from None
    if len(buf) < 8 or buf[4:8] != b"TFL3":
        raise ModelError(f"{path} is not a TFLite flatbuffer (no TFL3 identifier)")
    try:
        model = schema.ModelT.InitFromObj(schema.Model.GetRootAsModel(buf, 0))
    except Exception as exc:  # corrupt flatbuffer: any decoding error
        raise ModelError(f"{path} is a corrupt TFLite file: {exc}") from None
    if not model.subgraphs:
        raise ModelError(f"{path} has no subgraph")
    op_names = _names(schema.BuiltinOperator)
    graph = model.subgraphs[0]
    tensors = []
    for i, t in enumerate(graph.tensors):
        q = t.quantization
        scale = np.asarray(q.scale if q is not None and q.scale is not None else [], np.float64)
        zp = np.asarray(q.zeroPoint if q is not None and q.zeroPoint is not None else [],
                        np.int64)
        dtype = _DTYPES.get(t.type, np.uint8)
        shape = [int(d) for d in (t.shape if t.shape is not None else [])]
        sig = [int(d) for d in t.shapeSignature] if t.shapeSignature is not None else shape
        data = None
        buffer = model.buffers[t.buffer] if t.buffer < len(model.buffers) else None
        if buffer is not None and buffer.data is not None and len(buffer.data):
            data = np.frombuffer(np.asarray(buffer.data, np.uint8).tobytes(), dtype)
            data = data.reshape(shape) if shape else data.reshape(())
        tensors.append(TensorInfo(i, t.name.decode("utf-8", "replace") if t.name else "",
                                  shape, sig, dtype, scale, zp,
                                  int(q.quantizedDimension) if q is not None else 0, data))
    ops = []
    for i, op in enumerate(graph.operators):
        code = model.operatorCodes[op.opcodeIndex]
        opcode = op_names.get(max(code.builtinCode, code.deprecatedBuiltinCode), "UNKNOWN")
        options = dict(vars(op.builtinOptions)) if op.builtinOptions is not None else {}
        custom = code.customCode.decode() if code.customCode else ""
        ops.append(OpInfo(i, opcode, [int(x) for x in op.inputs],
                          [int(x) for x in op.outputs], options, custom))
    return TFLiteGraph(path, tensors, ops, [int(x) for x in graph.inputs],
                       [int(x) for x in graph.outputs])
