"""What a ``cmd/deploy``, ``cmd/rollback`` or ``cmd/models`` request may say (the schemas, checked
field by field by :mod:`edge_agent.comms.commands`) and the cross-field rules of a deployment;
the errors a deployment ends with. The protocol is described in :mod:`edge_agent.remote.deploy`.
"""

from __future__ import annotations

import base64
import math
from dataclasses import dataclass
from typing import Any, Dict, List, Optional

from edge_agent.comms.commands import (BoolField, FieldSpec, FloatField, IntField, RequestError, Schema,
                                       StrField)
from edge_agent.errors import EdgeAgentError
from edge_agent.sources.images import IMAGE_FORMATS, MAX_IMAGE_TEXT, image_size_problem


DEFAULT_CONFIRM_FRAMES = 5


DEFAULT_CONFIRM_TIMEOUT_S = 60.0


DEFAULT_TRANSFER_TIMEOUT_S = 30.0


MAX_CHUNKS = 100_000


MAX_LABELS = 256


MAX_REQUEST_BYTES = 4 * 1024 * 1024  # room for a base64 sample image and golden mask


_B64 = r"[A-Za-z0-9+/]*={0,2}"


class DeployFailed(EdgeAgentError):
    """The deployment started but the model was refused: answered ``failed``, old model kept."""


class Cancelled(DeployFailed):
    """The agent is stopping: the job ends now, answered ``failed`` before the agent goes offline."""


class LabelsField(FieldSpec):
    expected = f"a list of 1..{MAX_LABELS} strings (class names, index = class id)"

    def check(self, value: Any) -> List[str]:
        if not isinstance(value, list) or not 1 <= len(value) <= MAX_LABELS:
            raise ValueError
        if not all(isinstance(x, str) and len(x) <= 128 for x in value):
            raise ValueError
        return list(value)


def _b64decode(text: str) -> bytes:
    return base64.b64decode(text, validate=True)


def _sha_field(**kwargs: Any) -> StrField:
    return StrField(r"[0-9a-fA-F]{64}", "64 hex digits (sha256)", str.lower, **kwargs)


def _b64_field(what: str) -> StrField:
    return StrField(_B64, f"base64 ({what})", _b64decode)


DEPLOY_SCHEMA: Schema = {
    "name": StrField(r"[^/\\\x00-\x1f]{1,128}", "1-128 characters, no '/', '\\' or control characters",
                     required=True, doc="model name shown in info and the store"),
    "sha256": _sha_field(required=True, doc="sha256 of the .tflite"),
    "size": IntField(1, 1 << 40, required=True, doc="bytes; capped by deploy.max_size_mb"),
    "labels": LabelsField(nullable=True, doc="class names; default: the manifest's, if it knows the model"),
    "url": StrField(r"(?i)https?://[^\s]{1,2000}", "an http:// or https:// URL", doc="the agent downloads it"),
    "chunks": IntField(1, MAX_CHUNKS, doc="inline transfer: chunk count on cmd/deploy/<id>/chunk/<n>"),
    "chunk_size": IntField(1, 1 << 31, doc="bytes of every chunk but the last (default: size, one chunk)"),
    "signature": _b64_field("ed25519 signature of the deployment: sha256, name, labels, sample and "
                            "golden mask (models.signing.canonical)"),
    "sample": _b64_field(f"a {IMAGE_FORMATS} image for the sanity invoke, at most {MAX_IMAGE_TEXT}"),
    "golden_mask": _b64_field(f"PNG of the class ids expected on the sample, at most {MAX_IMAGE_TEXT}"),
    "min_agreement": FloatField(0.0, 1.0, default=0.9),
    "confirm_frames": IntField(0, 100_000, default=DEFAULT_CONFIRM_FRAMES,
                               doc="frames the new model must process before it is confirmed"),
    "confirm_timeout_s": FloatField(0.1, 86_400.0, default=DEFAULT_CONFIRM_TIMEOUT_S),
    "transfer_timeout_s": FloatField(0.1, 3_600.0, default=DEFAULT_TRANSFER_TIMEOUT_S,
                                     doc="longest pause between two chunks"),
    "activate": BoolField(default=True, doc="false: stage only (verified, checked and stored, not made "
                                            "current; e.g. to benchmark it by name, then remove it)"),
}


ROLLBACK_SCHEMA: Schema = {
    "to": StrField(r"[^\x00-\x1f]{1,128}", "a model name or sha256 (prefix >= 8) in the store",
                   doc="default: the previous model"),
    "confirm_frames": DEPLOY_SCHEMA["confirm_frames"],
    "confirm_timeout_s": DEPLOY_SCHEMA["confirm_timeout_s"],
}


MODELS_SCHEMA: Schema = {
    "remove": _sha_field(doc="delete this entry (not current, previous or pending) before listing"),
}


@dataclass
class DeployRequest:
    id: str
    name: str
    sha256: str
    size: int
    labels: Optional[List[str]] = None
    url: Optional[str] = None
    chunks: int = 0
    chunk_size: int = 0
    signature: Optional[bytes] = None
    sample: Optional[bytes] = None
    golden_mask: Optional[bytes] = None
    min_agreement: float = 0.9
    confirm_frames: int = DEFAULT_CONFIRM_FRAMES
    confirm_timeout_s: float = DEFAULT_CONFIRM_TIMEOUT_S
    transfer_timeout_s: float = DEFAULT_TRANSFER_TIMEOUT_S
    activate: bool = True


def deploy_request(rid: str, params: Dict[str, Any], max_size: int) -> DeployRequest:
    """Cross-field checks of validated ``cmd/deploy`` parameters; RequestError with the reason."""
    if params["size"] > max_size:
        raise RequestError(f"model too large: {params['size']} bytes > deploy.max_size_mb ({max_size} bytes)")
    if (params["url"] is None) == (params["chunks"] is None):
        raise RequestError("give exactly one of 'url' (the agent downloads) or 'chunks' (inline transfer)")
    if params["golden_mask"] is not None and params["sample"] is None:
        raise RequestError("golden_mask: needs the 'sample' image it belongs to")
    for key in ("sample", "golden_mask"):  # sized from the header: never decoded if too large
        if params[key] is not None:
            problem = image_size_problem(params[key], key)
            if problem is not None:
                raise RequestError(problem)
    req = DeployRequest(id=rid, **{k: v for k, v in params.items() if k not in ("chunks", "chunk_size")})
    if params["chunks"] is not None:
        req.chunks = params["chunks"]
        req.chunk_size = params["chunk_size"] or (req.size if req.chunks == 1 else 0)
        if req.chunk_size <= 0 or math.ceil(req.size / req.chunk_size) != req.chunks:
            raise RequestError(f"chunks ({req.chunks}) and chunk_size ({req.chunk_size}) do not fit "
                               f"size ({req.size}): chunks = ceil(size / chunk_size)")
    return req
