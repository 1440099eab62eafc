"""PNG chunk plumbing without numpy or OpenCV: writing and reading chunks, and the ``tEXt`` chunks
the agent's masks carry (the frame label; the store-and-forward replay mark)."""

from __future__ import annotations

import struct
import zlib
from typing import Iterator, Optional, Tuple

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(body, zlib.crc32(kind)))


def chunks(data: bytes) -> Iterator[Tuple[bytes, bytes]]:
    """(kind, body) of each chunk up to IEND; ValueError for what is not a PNG or is truncated."""
    if data[:8] != PNG_SIGNATURE:
        raise ValueError("not a PNG")
    pos = 8
    while pos + 8 <= len(data):
        length, kind = struct.unpack_from(">I4s", data, pos)
        body = data[pos + 8:pos + 8 + length]
        if len(body) != length:
            raise ValueError("truncated PNG")
        yield kind, body
        if kind == b"IEND":
            return
        pos += 12 + length
    raise ValueError("truncated PNG")


def text_chunk(key: bytes, value: bytes) -> bytes:
    return chunk(b"tEXt", key + b"\0" + value)


def insert_text(data: bytes, key: bytes, value: bytes) -> bytes:
    """``data`` with a ``tEXt`` chunk right after IHDR (``data`` unchanged when it is no PNG)."""
    if not data.startswith(PNG_SIGNATURE) or data[12:16] != b"IHDR":
        return data
    end = 8 + 12 + struct.unpack(">I", data[8:12])[0]  # signature + IHDR (length, type, data, crc)
    return data[:end] + text_chunk(key, value) + data[end:]


def read_text(data: bytes, key: bytes) -> Optional[bytes]:
    """The value of the ``tEXt`` chunk ``key`` before the image data; None when there is none or
    ``data`` is no (complete) PNG."""
    try:
        for kind, body in chunks(data):
            if kind == b"IDAT":
                return None
            if kind == b"tEXt" and body.startswith(key + b"\0"):
                return body[len(key) + 1:]
    except (ValueError, struct.error):
        return None
    return None
