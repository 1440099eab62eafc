"""Structural check of a TFLite flatbuffer before any runtime parses it.

LiteRT verifies flatbuffers, but tflite-runtime 2.14 does not: a truncated or corrupt file can
crash the whole process (SIGSEGV) inside ``Interpreter()``. This walks the parts of the schema the
interpreter dereferences first (tables, vectors, strings, buffer data, tensor/opcode indices) and
checks that every offset stays inside the file. Pure Python, ~1 ms for a DeepLab model.
"""

from __future__ import annotations

import struct
from typing import Callable, List, Optional, Tuple


class BadFlatbuffer(Exception):
    pass


class _Reader:
    def __init__(self, data: bytes) -> None:
        self.data = data
        self.n = len(data)

    def _unpack(self, fmt: str, pos: int, size: int):
        if pos < 0 or pos + size > self.n:
            raise BadFlatbuffer(f"offset {pos}+{size} past the end of the file ({self.n} bytes)")
        return struct.unpack_from(fmt, self.data, pos)[0]

    def u16(self, pos: int) -> int:
        return self._unpack("<H", pos, 2)

    def u32(self, pos: int) -> int:
        return self._unpack("<I", pos, 4)

    def i32(self, pos: int) -> int:
        return self._unpack("<i", pos, 4)

    def u64(self, pos: int) -> int:
        return self._unpack("<Q", pos, 8)

    def table(self, pos: int) -> Callable[[int], Optional[int]]:
        """Return field(i) -> absolute position of field i, or None when absent."""
        vtable = pos - self.i32(pos)
        vt_len = self.u16(vtable)
        obj_len = self.u16(vtable + 2)
        if vt_len < 4 or pos + obj_len > self.n:
            raise BadFlatbuffer(f"table at {pos} does not fit in the file")

        def field(i: int) -> Optional[int]:
            entry = 4 + 2 * i
            if entry + 2 > vt_len:
                return None
            rel = self.u16(vtable + entry)
            if not rel:
                return None
            if rel >= obj_len:
                raise BadFlatbuffer(f"field {i} of table at {pos} outside the table")
            return pos + rel

        return field

    def deref(self, pos: int) -> int:
        return pos + self.u32(pos)

    def vector(self, pos: int, elem_size: int) -> Tuple[int, int]:
        """(start of elements, length) of the vector whose offset is stored at ``pos``."""
        start = self.deref(pos)
        length = self.u32(start)
        if start + 4 + length * elem_size > self.n:
            raise BadFlatbuffer(f"vector at {start} ({length} x {elem_size} bytes) past the end")
        return start + 4, length

    def tables(self, pos: Optional[int]) -> List[Callable[[int], Optional[int]]]:
        if pos is None:
            return []
        start, length = self.vector(pos, 4)
        return [self.table(self.deref(start + 4 * i)) for i in range(length)]

    def ints(self, pos: Optional[int]) -> List[int]:
        if pos is None:
            return []
        start, length = self.vector(pos, 4)
        return [self.i32(start + 4 * i) for i in range(length)]


def check(data: bytes) -> Optional[str]:
    """None when the flatbuffer is structurally sound, else what is wrong (one line)."""
    try:
        _check(_Reader(data))
    except BadFlatbuffer as exc:
        return str(exc)
    return None


def _check(r: _Reader) -> None:
    model = r.table(r.u32(0))
    opcodes = r.tables(model(1))
    buffers = r.tables(model(4))
    for i, buf in enumerate(buffers):
        if buf(0) is not None:
            r.vector(buf(0), 1)
        if buf(1) is not None and buf(2) is not None:  # large models: data after the flatbuffer
            offset, size = r.u64(buf(1)), r.u64(buf(2))
            if offset > 1 and offset + size > r.n:
                raise BadFlatbuffer(f"buffer {i} data ({offset}+{size}) past the end of the file")
    subgraphs = r.tables(model(2))
    if not subgraphs:
        raise BadFlatbuffer("the model has no subgraph")
    for g, subgraph in enumerate(subgraphs):
        tensors = r.tables(subgraph(0))
        for t, tensor in enumerate(tensors):
            r.ints(tensor(0))  # shape
            if tensor(2) is not None and r.u32(tensor(2)) >= max(1, len(buffers)):
                raise BadFlatbuffer(f"subgraph {g} tensor {t} names buffer {r.u32(tensor(2))} of {len(buffers)}")
        for index in r.ints(subgraph(1)) + r.ints(subgraph(2)):
            if not 0 <= index < len(tensors):
                raise BadFlatbuffer(f"subgraph {g} input/output tensor {index} of {len(tensors)}")
        for o, op in enumerate(r.tables(subgraph(3))):
            code = r.u32(op(0)) if op(0) is not None else 0
            if code >= len(opcodes):
                raise BadFlatbuffer(f"subgraph {g} operator {o} uses opcode {code} of {len(opcodes)}")
            for index in r.ints(op(1)) + r.ints(op(2)):
                if not -1 <= index < len(tensors):
                    raise BadFlatbuffer(f"subgraph {g} operator {o} uses tensor {index} of {len(tensors)}")
