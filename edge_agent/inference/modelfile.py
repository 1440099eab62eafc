"""The ``.tflite`` file itself: checked to be a complete TFLite flatbuffer before any runtime parses
it (tflite-runtime 2.14 segfaults on truncated ones), hashed, its TFLite Metadata and the ops that
write its outputs read, Edge TPU builds spotted.
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass, field
from typing import Dict, Optional

from edge_agent.inference import tflite_check
from edge_agent.errors import ModelError
from edge_agent.inference.metadata import ModelMetadata, output_producers, read_metadata
from edge_agent.inference.runtimes import edgetpu

log = logging.getLogger("edge_agent.inference.model")  # file problems log as the model always did

TFLITE_IDENTIFIER = b"TFL3"


@dataclass
class ModelFile:
    path: str
    sha256: str
    size: int
    edgetpu: bool
    metadata: Optional[ModelMetadata] = None
    metadata_problem: Optional[str] = None
    producers: Dict[int, str] = field(default_factory=dict)  # output tensor -> op writing it

    @property
    def name(self) -> str:
        return os.path.splitext(os.path.basename(self.path))[0]


def read_model_file(path: str) -> ModelFile:
    """Check that ``path`` is a readable TFLite flatbuffer; hash it; spot Edge TPU builds."""
    if not path:
        raise ModelError("no model given: pass --model PATH or a model name from the manifest")
    if not os.path.exists(path):
        raise ModelError(f"{path}: model file not found")
    if os.path.isdir(path):
        raise ModelError(f"{path}: is a directory, not a .tflite model")
    try:
        with open(path, "rb") as fh:
            data = fh.read()
    except OSError as exc:
        raise ModelError(f"{path}: cannot read model ({exc.strerror})") from exc
    if len(data) < 8 or data[4:8] != TFLITE_IDENTIFIER:
        raise ModelError(
            f"{path}: not a TFLite model (no 'TFL3' flatbuffer identifier; "
            f"{len(data)} bytes, corrupt or wrong file?)"
        )
    problem = tflite_check.check(data)
    if problem:
        raise ModelError(f"{path}: corrupt TFLite model ({problem})")
    metadata, metadata_problem = read_metadata(data)
    if metadata_problem:
        log.warning("%s: %s; using the settings and defaults instead", path, metadata_problem)
    return ModelFile(
        path=path,
        sha256=hashlib.sha256(data).hexdigest(),
        size=len(data),
        edgetpu=edgetpu.is_edgetpu_model(data),
        metadata=metadata,
        metadata_problem=metadata_problem,
        producers=output_producers(data),
    )
