"""Model deployment over MQTT: verified, atomic, with rollback (``cmd/deploy``, ``cmd/rollback``, ``cmd/models``).

A deployment is only ever *added* next to the running model: the bytes arrive in a temporary
file of the store, are checked (size, sha256, optional ed25519 signature), loaded with the
agent's runtime settings and invoked once on a sample frame (optionally compared with a golden
mask).  Only then the pipeline swaps to it between two frames, the store's ``current`` pointer
moves with a ``pending`` marker, and after ``confirm_frames`` frames ran on it the marker is
dropped.  Any failure before that point leaves the old model serving and answers ``failed``; a
failure during confirmation swaps the old model back; a crash or a watchdog kill leaves the
marker, and the next start rolls back (see :mod:`edge_agent.models.store`).

Protocol (topics under ``<prefix>/<device_id>/`` or the fleet's ``<prefix>/all/``; request
parsing, request ids, duplicates and answers are :mod:`edge_agent.comms.commands`')::

    cmd/deploy                        JSON (DEPLOY_SCHEMA): request_id, name, sha256, size,
                                      labels?, signature?, and "url" or "chunks" (+ chunk_size)
    cmd/deploy/<request_id>/chunk/<n> binary chunk n (0-based) of an inline transfer
    deploy/<request_id>               answers: accepted; progress (stage: downloading, verifying,
                                      checking, activating); one final: done (state: active or
                                      rolled_back), failed or rejected, with the reason
    cmd/rollback                      {request_id, to?: name or sha256}; answers on deploy/<id>
    cmd/models                        {request_id}; the store listing on models/<request_id>

Senders of inline transfers wait for ``accepted`` before publishing chunks (a refused request
costs no transfer).  Answers also go to the MQTT 5 response topic when the request has one.
"""

from __future__ import annotations

import base64
import errno
import http.client
import logging
import math
import os
import socket
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Set, Tuple

import cv2
import numpy as np

from edge_agent.comms.commands import (CommandChannel, FieldSpec, FloatField, IntField, Request, RequestError,
                                       Schema, StrField)
from edge_agent.system import release_memory
from edge_agent.errors import EdgeAgentError
from edge_agent.inference.postprocess import agreement
from edge_agent.inference.segmenter import Segmenter
from edge_agent.models import catalog, signing
from edge_agent.models.store import ModelStore, StoredModel, sha256_file
from edge_agent.output.encode import PNG_SIGNATURE, decode_mask_png, png_palette
from edge_agent.output.throttle import Throttle
from edge_agent.remote.context import HandlerContext, Route

log = logging.getLogger(__name__)

KIND = "deploy"  # answers of cmd/deploy and cmd/rollback: deploy/<request_id>
MODELS_KIND = "models"
DEFAULT_CONFIRM_FRAMES = 5
DEFAULT_CONFIRM_TIMEOUT_S = 60.0
DEFAULT_TRANSFER_TIMEOUT_S = 30.0
MAX_CHUNKS = 100_000
MAX_LABELS = 256
MAX_REQUEST_BYTES = 4 * 1024 * 1024  # room for a base64 sample image and golden mask
PROGRESS_INTERVAL_S = 1.0  # at most one progress answer a second
_B64 = r"[A-Za-z0-9+/]*={0,2}"


class DeployFailed(EdgeAgentError):
    """The deployment started but the model was refused: answered ``failed``, old model kept."""


class Cancelled(DeployFailed):
    """The agent is stopping: the job ends now, answered ``failed`` before the agent goes offline."""


def storage_problem(exc: OSError) -> str:
    """One line for a failed write into the model store (disk full, read-only, permissions)."""
    if exc.errno == errno.ENOSPC:
        return "no space left on the device (agent.state_dir)"
    if exc.errno == errno.EDQUOT:
        return "disk quota exceeded (agent.state_dir)"
    if exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        return f"the model store is not writable: {exc.strerror} (agent.state_dir)"
    return f"cannot write to the model store: {exc.strerror or exc}"


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
    "signature": _b64_field("ed25519 signature of the raw sha256 digest"),
    "sample": _b64_field("an image file for the sanity invoke"),
    "golden_mask": _b64_field("PNG of the class ids expected on the sample"),
    "min_agreement": FloatField(0.0, 1.0, default=0.9),
    "confirm_frames": IntField(0, 100_000, default=DEFAULT_CONFIRM_FRAMES,
                               doc="frames the new model must process before it is confirmed"),
    "confirm_timeout_s": FloatField(0.1, 86_400.0, default=DEFAULT_CONFIRM_TIMEOUT_S),
    "transfer_timeout_s": FloatField(0.1, 3_600.0, default=DEFAULT_TRANSFER_TIMEOUT_S,
                                     doc="longest pause between two chunks"),
}
ROLLBACK_SCHEMA: Schema = {
    "to": StrField(r"[^\x00-\x1f]{1,128}", "a model name or sha256 (prefix >= 8) in the store",
                   doc="default: the previous model"),
    "confirm_frames": DEPLOY_SCHEMA["confirm_frames"],
    "confirm_timeout_s": DEPLOY_SCHEMA["confirm_timeout_s"],
}
MODELS_SCHEMA: Schema = {}


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


def deploy_request(rid: str, params: Dict[str, Any], max_size: int) -> DeployRequest:
    """Cross-field checks of validated ``cmd/deploy`` parameters; RequestError with the reason."""
    if params["size"] > max_size:
        raise RequestError(f"model too large: {params['size']} bytes > deploy.max_size_mb ({max_size} bytes)")
    if (params["url"] is None) == (params["chunks"] is None):
        raise RequestError("give exactly one of 'url' (the agent downloads) or 'chunks' (inline transfer)")
    if params["golden_mask"] is not None and params["sample"] is None:
        raise RequestError("golden_mask: needs the 'sample' image it belongs to")
    req = DeployRequest(id=rid, **{k: v for k, v in params.items() if k not in ("chunks", "chunk_size")})
    if params["chunks"] is not None:
        req.chunks = params["chunks"]
        req.chunk_size = params["chunk_size"] or (req.size if req.chunks == 1 else 0)
        if req.chunk_size <= 0 or math.ceil(req.size / req.chunk_size) != req.chunks:
            raise RequestError(f"chunks ({req.chunks}) and chunk_size ({req.chunk_size}) do not fit "
                               f"size ({req.size}): chunks = ceil(size / chunk_size)")
    return req


# -- receiving the bytes ---------------------------------------------------------------------------

class ChunkAssembler:
    """Writes chunks (any order, duplicates ignored) at their offsets into one file.

    Every chunk but the last must be exactly ``chunk_size`` bytes and the last the remainder, so
    a chunk is checked on arrival and memory holds none of them.  Thread-safe; ``wait`` returns
    when complete, failed, or after ``idle_timeout_s`` without a new chunk.
    """

    def __init__(self, path: Path, size: int, count: int, chunk_size: int) -> None:
        self.path, self.size, self.count, self.chunk_size = path, size, count, chunk_size
        self._fd = os.open(str(path), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        self._received: Set[int] = set()
        self._cond = threading.Condition()
        self._last = time.monotonic()
        self.bytes = 0
        self.duplicates = 0
        self.error: Optional[str] = None
        self.storage_failed = False

    def expected_length(self, n: int) -> int:
        return self.chunk_size if n < self.count - 1 else self.size - self.chunk_size * (self.count - 1)

    def add(self, n: int, data: bytes) -> None:
        with self._cond:
            if self.error is not None or self._fd < 0:
                return
            self._last = time.monotonic()
            if not 0 <= n < self.count:
                self.error = f"chunk {n} is out of range (the transfer has {self.count} chunks)"
            elif n in self._received:
                self.duplicates += 1
                return
            elif len(data) != self.expected_length(n):
                self.error = f"chunk {n} has {len(data)} bytes, expected {self.expected_length(n)}"
            else:
                try:
                    _pwrite_all(self._fd, data, n * self.chunk_size)
                except OSError as exc:  # disk full, I/O error: fail the transfer at once
                    self.error = f"{storage_problem(exc)}: transfer stopped, the partial file removed"
                    self.storage_failed = True
                else:
                    self._received.add(n)
                    self.bytes += len(data)
            self._cond.notify_all()

    def fail(self, reason: str) -> None:
        with self._cond:
            self.error = self.error or reason
            self._cond.notify_all()

    @property
    def complete(self) -> bool:
        return len(self._received) == self.count

    def missing(self, limit: int = 10) -> List[int]:
        with self._cond:
            return [n for n in range(self.count) if n not in self._received][:limit]

    def wait(self, idle_timeout_s: float, on_progress: Callable[[int], None]) -> None:
        """Until all chunks arrived; raises DeployFailed on a bad chunk or an idle timeout."""
        with self._cond:
            while self.error is None and not self.complete:
                idle = time.monotonic() - self._last
                if idle >= idle_timeout_s:
                    missing = [n for n in range(self.count) if n not in self._received]
                    shown = ", ".join(map(str, missing[:10])) + (" ..." if len(missing) > 10 else "")
                    raise DeployFailed(f"transfer incomplete: no chunk for {idle_timeout_s:g} s; "
                                       f"{len(missing)} of {self.count} chunks missing ({shown})")
                self._cond.wait(min(PROGRESS_INTERVAL_S, idle_timeout_s - idle))
                received = self.bytes
                self._cond.release()
                try:
                    on_progress(received)
                finally:
                    self._cond.acquire()
            if self.error is not None:
                raise DeployFailed(self.error if self.storage_failed else f"transfer refused: {self.error}")

    def close(self) -> None:
        with self._cond:
            if self._fd >= 0:
                try:
                    if self.error is None:
                        os.fsync(self._fd)
                finally:
                    os.close(self._fd)
                    self._fd = -1
            if self.error is None and not self.complete:
                self.error = "transfer abandoned"
            self._cond.notify_all()


def _pwrite_all(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        view, offset = view[written:], offset + written


def _response_socket(resp: Any) -> Any:
    """The socket under an ``http.client`` response (to bound each read by the time left), or None."""
    raw = getattr(getattr(resp, "fp", None), "raw", None)
    sock = getattr(raw, "_sock", None)
    return sock if hasattr(sock, "settimeout") else None


def fetch_url(url: str, path: Path, limit: int, timeout_s: float, on_progress: Callable[[int], None],
              on_connected: Callable[[Callable[[], None]], None] = lambda abort: None) -> None:
    """Download ``url`` into ``path``: at most ``limit`` bytes, within ``timeout_s`` OVERALL.

    ``timeout_s`` is a deadline for the whole download (``deploy.url_timeout_s``), not per read: a
    server trickling a byte at a time must not hold the one deployment slot. Each read returns
    what one ``recv`` got (``read1``) and may wait only the time left. ``on_progress(received)``
    after every block (the caller throttles); ``on_connected(abort)`` hands out a function that
    ends a blocked read from another thread (the agent stopping)."""
    deadline = time.monotonic() + timeout_s
    timed_out = f"download timed out after {timeout_s:g} s (deploy.url_timeout_s limits the whole download)"
    request = urllib.request.Request(url, headers={"User-Agent": "edge-agent"})
    total = 0
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as resp:
            length = resp.headers.get("Content-Length")
            if length and length.isdigit() and int(length) > limit:
                raise DeployFailed(f"download refused: {url} has {length} bytes, more than the {limit} expected")
            sock = _response_socket(resp)
            if sock is not None:
                on_connected(lambda: sock.shutdown(socket.SHUT_RDWR))
            with open(path, "wb") as out:
                while True:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise DeployFailed(timed_out)
                    if sock is not None:
                        sock.settimeout(left)  # a timed-out socket cannot be read again: no slices
                    block = resp.read1(1 << 16)
                    if not block:
                        break
                    total += len(block)
                    if total > limit:
                        raise DeployFailed(f"download refused: {url} sends more than the {limit} bytes expected")
                    try:
                        out.write(block)
                    except OSError as exc:
                        raise DeployFailed(f"{storage_problem(exc)}: download stopped, the partial file "
                                           "removed") from None
                    on_progress(total)
                try:
                    out.flush()
                    os.fsync(out.fileno())
                except OSError as exc:
                    raise DeployFailed(storage_problem(exc)) from None
    except DeployFailed:
        raise
    except TimeoutError:
        raise DeployFailed(timed_out) from None
    except (OSError, http.client.HTTPException) as exc:  # URLError, HTTPError, refused, cut off
        reason = getattr(exc, "reason", None) or exc
        if isinstance(exc, urllib.error.HTTPError):
            reason = f"HTTP {exc.code} {exc.reason}"
        raise DeployFailed(f"cannot download {url}: {reason}") from None


def verify_file(path: Path, size: int, sha: str) -> None:
    actual_size = path.stat().st_size
    if actual_size != size:
        raise DeployFailed(f"size mismatch: received {actual_size} bytes, the request says {size}")
    actual = sha256_file(path)
    if actual != sha:
        raise DeployFailed(f"sha256 mismatch: received {actual}, the request says {sha}")


# -- checking the model ----------------------------------------------------------------------------

def decode_image(data: bytes, what: str, flags: int = cv2.IMREAD_COLOR) -> np.ndarray:
    image = cv2.imdecode(np.frombuffer(data, np.uint8), flags)
    if image is None:
        raise DeployFailed(f"the {what} is not a decodable image")
    return image


def decode_golden_mask(data: bytes) -> np.ndarray:
    """Class ids of a golden mask: a palette PNG (what the agent and ``segment`` write: the
    palette index is the id; read as grey it would be the colours' luminance) or a grey image."""
    if data[:8] == PNG_SIGNATURE:
        try:
            if png_palette(data) is not None:
                return decode_mask_png(data)
        except ValueError as exc:
            raise DeployFailed(f"the golden mask is not a usable palette PNG: {exc}") from None
    return decode_image(data, "golden mask", cv2.IMREAD_GRAYSCALE)


def synthetic_frame(height: int, width: int) -> np.ndarray:
    """A deterministic, textured RGB frame: enough to exercise every op of the graph."""
    y, x = np.mgrid[0:height, 0:width]
    r = (x * 255 // max(1, width - 1)).astype(np.uint8)
    g = (y * 255 // max(1, height - 1)).astype(np.uint8)
    b = (((x // 32) + (y // 32)) % 2 * 200).astype(np.uint8)
    return np.dstack([r, g, b])


def sanity_check(segmenter: Segmenter, sample: Optional[bytes], golden: Optional[bytes],
                 min_agreement: float) -> Dict[str, Any]:
    """One real invoke on a frame; the mask must be well formed (and match the golden one)."""
    if sample is not None:
        frame = cv2.cvtColor(decode_image(sample, "sample image"), cv2.COLOR_BGR2RGB)
    else:
        frame = synthetic_frame(*segmenter.model.input_size)
    t0 = time.monotonic()
    result = segmenter.segment(frame)
    elapsed_ms = (time.monotonic() - t0) * 1e3
    mask = result.mask
    if mask.shape != frame.shape[:2] or mask.dtype != np.uint8:
        raise DeployFailed(f"sanity invoke: mask {mask.shape} {mask.dtype} for a {frame.shape[:2]} frame")
    labels = segmenter.labels
    classes = segmenter.model.output.classes
    if labels and classes and len(labels) != classes:
        raise DeployFailed(f"{len(labels)} labels for a model with {classes} classes")
    top = int(mask.max())
    if labels and top >= len(labels):
        raise DeployFailed(f"sanity invoke: class id {top} but only {len(labels)} labels")
    report: Dict[str, Any] = {"sanity_ms": round(elapsed_ms, 1)}
    if golden is not None:
        expected = decode_golden_mask(golden)
        if expected.shape != mask.shape:
            raise DeployFailed(f"golden mask is {expected.shape[1]}x{expected.shape[0]}, "
                               f"the sample {mask.shape[1]}x{mask.shape[0]}")
        score = agreement(mask, expected)
        report["agreement"] = round(score, 4)
        if score < min_agreement:
            raise DeployFailed(f"golden mask agreement {score:.3f} < {min_agreement:g}")
    return report


def run_with_timeout(fn: Callable[[], Any], timeout_s: float, what: str,
                     cancelled: Callable[[], Optional[str]] = lambda: None) -> Any:
    """Run ``fn`` on a daemon thread; a hung interpreter must not hang the deployment forever,
    nor an agent that stops (``cancelled()`` returns why)."""
    box: Dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = fn()
        except BaseException as exc:  # re-raised on the caller's thread
            box["error"] = exc

    thread = threading.Thread(target=target, name="deploy-check", daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout_s
    while thread.is_alive() and time.monotonic() < deadline:
        stop = cancelled()
        if stop is not None:
            raise Cancelled(f"{stop} during {what}")
        thread.join(min(0.1, max(0.0, deadline - time.monotonic())))
    if thread.is_alive():
        raise DeployFailed(f"{what} did not finish within {timeout_s:g} s")
    if "error" in box:
        raise box["error"]
    return box.get("value")


# -- the agent side ----------------------------------------------------------------------------------

@dataclass
class _Job:
    """One deployment or rollback in progress."""

    request: Request
    kind: str  # "deploy" | "rollback"
    spec: DeployRequest
    assembler: Optional[ChunkAssembler] = None
    temp: Optional[Path] = None
    fields: Dict[str, Any] = field(default_factory=dict)
    stopping: Optional[str] = None  # set by Deployer.shutdown: why the job must end now
    aborts: List[Callable[[], None]] = field(default_factory=list)  # end a blocked transfer
    thread: Optional[threading.Thread] = None

    @property
    def id(self) -> str:
        return self.request.id

    def cancelled(self) -> Optional[str]:
        return self.stopping

    def stop(self, reason: str) -> None:
        """End the job soon (the worker answers ``failed``): wake what it waits on."""
        self.stopping = reason
        if self.assembler is not None:
            self.assembler.fail(reason)
        for abort in list(self.aborts):
            try:
                abort()
            except OSError:
                pass


class Deployer:
    """Handles cmd/deploy, cmd/rollback and cmd/models for one agent; one job at a time.

    It receives, verifies and checks models; making one the running model (swap, pending marker,
    confirmation, undo) is the model manager's (:meth:`ModelManager.activate`).
    """

    def __init__(self, ctx: HandlerContext) -> None:
        self.ctx = ctx
        self.models = ctx.models
        cfg = ctx.config().deploy
        self.max_size = int(cfg.max_size_mb) * 1024 * 1024
        self.url_timeout_s = float(cfg.url_timeout_s)
        comms = ctx.comms  # the agent may replace its comms on reload
        self.deploy_channel = CommandChannel(comms, KIND, DEPLOY_SCHEMA, MAX_REQUEST_BYTES)
        self.rollback_channel = CommandChannel(comms, KIND, ROLLBACK_SCHEMA,
                                               share_ids_with=self.deploy_channel)
        self.models_channel = CommandChannel(comms, MODELS_KIND, MODELS_SCHEMA)
        self._lock = threading.Lock()
        self._job: Optional[_Job] = None
        self._stopping: Optional[str] = None

    @classmethod
    def create(cls, ctx: HandlerContext) -> "Deployer":
        """Always built: without a usable store every request is answered ``rejected`` with why."""
        return cls(ctx)

    @property
    def public_key(self) -> Any:
        return self.models.public_key  # the model manager's: one key for every path to "current"

    @property
    def store(self) -> ModelStore:
        """The store, ready to be written; RequestError (answered ``rejected``) saying why not."""
        store = self.models.store
        if store is None:
            raise RequestError(f"deployments disabled: {self.models.store_problem or 'no model store'}")
        try:
            store.check_writable()
        except OSError as exc:
            raise RequestError(f"deployments disabled: {storage_problem(exc)}") from None
        return store

    def routes(self) -> Iterable[Route]:
        return [Route("deploy", self.on_deploy, subtree=True), Route("rollback", self.on_rollback),
                Route("models", self.on_models)]

    def shutdown(self, reason: str = "agent stopping", timeout: float = 5.0) -> None:
        """End the running job with its final answer (``failed``: the reason), flush every answer.

        Called before the agent's comms stop, so each request in flight is answered before
        ``offline``. A job that does not end in time (a hung interpreter) is answered from here."""
        deadline = time.monotonic() + timeout
        with self._lock:
            self._stopping = reason  # no new job from here on: it could not be answered
            job = self._job
        if job is not None:
            job.stop(reason)
            if job.thread is not None:
                job.thread.join(max(0.0, deadline - 1.0 - time.monotonic()))
            if not job.request.finished:
                job.request.fail(f"{reason}: the {job.kind} did not finish", **job.fields,
                                 running=self._running_sha())
        for channel in (self.deploy_channel, self.rollback_channel, self.models_channel):
            channel.outbox.flush(max(0.0, deadline - time.monotonic()))

    # -- MQTT entry points (paho's thread: validate, answer, hand off) ----------------------------
    def on_deploy(self, topic: str, payload: bytes, props: Dict[str, Any]) -> None:
        parts = topic.split("/")
        if len(parts) >= 5 and parts[-2] == "chunk" and parts[-4] == "deploy" and parts[-5] == "cmd":
            self._on_chunk(parts[-3], parts[-1], payload)
        elif parts[-2:] == ["cmd", "deploy"]:
            request = self.deploy_channel.receive(topic, payload, props)
            if request is not None:
                self._guarded(request, self._start_deploy)

    def on_rollback(self, topic: str, payload: bytes, props: Dict[str, Any]) -> None:
        request = self.rollback_channel.receive(topic, payload, props)
        if request is not None:
            self._guarded(request, self._start_rollback)

    def on_models(self, topic: str, payload: bytes, props: Dict[str, Any]) -> None:
        request = self.models_channel.receive(topic, payload, props)
        if request is None:
            return
        store = self.models.store
        if store is None:
            request.reject(f"no model store: {self.models.store_problem}", running=self._running_sha())
        else:
            request.done(running=self._running_sha(), **store.describe())

    def _guarded(self, request: Request, start: Callable[[Request], None]) -> None:
        try:
            start(request)
        except (RequestError, EdgeAgentError) as exc:
            log.warning("%s %s rejected: %s", request.channel.kind, request.id, exc)
            request.reject(str(exc), running=self._running_sha())

    def _claim(self, job: _Job) -> None:
        with self._lock:
            if self._stopping is not None:
                raise RequestError(self._stopping)
            if self._job is not None:
                raise RequestError(f"busy: {self._job.kind} {self._job.id} is in progress")
            self._job = job

    def _start_deploy(self, request: Request) -> None:
        req = deploy_request(request.id, request.params, self.max_size)
        self._check_signature(req)
        job = _Job(request, "deploy", req, fields={"name": req.name, "sha256": req.sha256, "size": req.size})
        if req.sha256 == self._running_sha():
            request.done(state="active", note="already running this model: nothing transferred", **job.fields)
            return
        store = self.store
        self._claim(job)
        try:
            job.temp = store.incoming_file(req.id)
            if req.chunks:
                job.assembler = ChunkAssembler(job.temp, req.size, req.chunks, req.chunk_size)
        except OSError as exc:
            self._release(job)
            if job.temp is not None:
                job.temp.unlink(missing_ok=True)
            raise RequestError(storage_problem(exc)) from None
        # accepted before the worker can send progress; senders of chunks wait for it
        request.accept(transfer="chunks" if req.chunks else "url", chunks=req.chunks or None, **job.fields)
        self._start_worker(job, self._deploy)

    def _start_worker(self, job: _Job, work: Callable[[_Job], Dict[str, Any]]) -> None:
        job.thread = threading.Thread(target=self._run_job, args=(job, work), name=f"{job.kind}-{job.id}",
                                      daemon=True)
        job.thread.start()

    def _check_signature(self, req: DeployRequest) -> None:
        if self.models.key_problem is not None:
            raise RequestError(f"deployments disabled: {self.models.key_problem}")
        if self.public_key is None:
            return
        if not req.signature:
            raise RequestError("unsigned deployment refused: deploy.public_key is configured")
        signing.verify_digest(self.public_key, req.sha256, req.signature)

    def _start_rollback(self, request: Request) -> None:
        target = self._rollback_target(request.params["to"])
        spec = DeployRequest(id=request.id, name=target.name, sha256=target.sha256,
                             size=int(target.manifest.get("size") or 0),
                             confirm_frames=request.params["confirm_frames"],
                             confirm_timeout_s=request.params["confirm_timeout_s"])
        job = _Job(request, "rollback", spec, fields={"name": target.name, "sha256": target.sha256})
        if target.sha256 == self._running_sha():
            raise RequestError(f"already running {target.name} ({target.sha256[:12]})")
        problem = self.models.trust_problem(target)
        if problem is not None:
            raise RequestError(f"rollback refused: {problem}")
        self._claim(job)
        request.accept(**job.fields)
        self._start_worker(job, self._rollback)

    def _rollback_target(self, to: Optional[str]) -> StoredModel:
        store = self.store
        if to is None:
            sha = store.previous()
            if sha is None or not store.has(sha):
                raise RequestError("no previous model in the store to roll back to")
            return store.get(sha)
        entry = store.find(to)
        if entry is None:
            raise RequestError(f"no model '{to}' in the store")
        return entry

    def _on_chunk(self, rid: str, number: str, payload: bytes) -> None:
        job = self._job
        if job is None or job.id != rid or job.assembler is None:
            log.debug("chunk %s of unknown or finished deployment %s ignored", number, rid)
            return
        if not number.isdigit() or len(number) > 9:
            job.assembler.fail(f"bad chunk number {number[:20]!r}")
            return
        job.assembler.add(int(number), payload)

    # -- the worker ----------------------------------------------------------------------------
    def _run_job(self, job: _Job, work: Callable[[_Job], Dict[str, Any]]) -> None:
        """Run the job; clean up (partial file, slot) BEFORE the final answer, so what it says holds."""
        status, fields = "failed", {}
        try:
            fields = work(job)
            status = "done"
        except EdgeAgentError as exc:
            log.error("%s %s failed: %s", job.kind, job.id, exc)
            fields["reason"] = str(exc)
        except OSError as exc:  # the store cannot be written (disk full, read-only, I/O error)
            log.error("%s %s failed: %s", job.kind, job.id, exc)
            fields["reason"] = storage_problem(exc)
        except Exception as exc:  # a bug must answer too: the requester is waiting
            log.exception("%s %s crashed", job.kind, job.id)
            fields["reason"] = f"internal error: {type(exc).__name__}: {exc}"
        finally:
            try:
                if job.assembler is not None:
                    job.assembler.close()
                if job.temp is not None:
                    job.temp.unlink(missing_ok=True)
            except OSError as exc:
                log.warning("%s %s: cleaning up: %s", job.kind, job.id, exc)
            finally:
                self._release(job)
                job.request.send(status, **{**job.fields, **fields}, running=self._running_sha())
                release_memory()  # the test run's and the swapped-out model's heap

    def _release(self, job: _Job) -> None:
        with self._lock:
            if self._job is job:
                self._job = None

    def _deploy(self, job: _Job) -> Dict[str, Any]:
        req = job.spec
        store = self.models.store
        assert job.temp is not None and store is not None
        progress = self._progress_reporter(job, req.size)
        try:
            if job.stopping is not None:  # stopped before this worker began
                raise DeployFailed(job.stopping)
            if job.assembler is not None:
                job.assembler.wait(req.transfer_timeout_s, progress)
                job.assembler.close()
                if job.assembler.duplicates:
                    job.fields["duplicate_chunks"] = job.assembler.duplicates
            else:
                fetch_url(req.url or "", job.temp, req.size, self.url_timeout_s, progress,
                          on_connected=job.aborts.append)
        except DeployFailed:
            if job.stopping is None:
                raise
        if job.stopping is not None:
            raise Cancelled(f"{job.stopping}: transfer abandoned")
        job.request.progress(stage="verifying", **job.fields)
        verify_file(job.temp, req.size, req.sha256)
        placed = store.place(job.temp, req.sha256)
        try:
            segmenter, report = self._load_and_check(job, store.model_path(req.sha256))
            job.fields.update(report)
            signature = base64.b64encode(req.signature).decode("ascii") if req.signature else None
            store.write_manifest(req.sha256, {  # a re-deployment refreshes it (and its signature)
                "name": req.name, "labels": segmenter.labels, "input_size": list(segmenter.model.input_size),
                "source": req.url or "mqtt", "request_id": req.id, "deployed_at": round(time.time(), 3),
                "size": req.size, "signature": signature,
                "signed": bool(req.signature and self.public_key is not None)})
        except BaseException:
            if placed:
                store.discard(req.sha256)
            raise
        return self._activate(job, segmenter, "active")

    def _rollback(self, job: _Job) -> Dict[str, Any]:
        assert self.models.store is not None
        entry = self.models.store.get(job.spec.sha256)
        segmenter, report = self._load_and_check(job, entry.path, labels=entry.labels)
        job.fields.update(report)
        return self._activate(job, segmenter, "rolled_back")

    def _load_and_check(self, job: _Job, path: Path,
                        labels: Optional[List[str]] = None) -> Tuple[Segmenter, Dict[str, Any]]:
        req = job.spec
        m = self.ctx.config().model
        labels = labels or req.labels or catalog.resolve(str(path)).labels  # a manifest model brings its own

        def load() -> Tuple[Segmenter, Dict[str, Any]]:
            # No cpu_fallback: a deployment must run what was deployed, or be refused.
            segmenter = self.models.build(str(path), labels, cpu_fallback=None)
            return segmenter, sanity_check(segmenter, req.sample, req.golden_mask, req.min_agreement)

        job.request.progress(stage="checking", **job.fields)
        try:
            return run_with_timeout(load, 3 * m.inference_timeout_s + 30.0, "loading and the sanity invoke",
                                    job.cancelled)
        except DeployFailed:
            raise
        except EdgeAgentError as exc:  # ModelError, RuntimeNotAvailable, InferenceError
            text = str(exc).replace(f"{path}: ", "").replace(str(path), path.name)  # no store paths
            raise DeployFailed(f"model refused: {text}") from None

    def _activate(self, job: _Job, segmenter: Segmenter, final: str) -> Dict[str, Any]:
        """Hand the checked model to the model manager: swap, confirm on real frames (or undo)."""
        req = job.spec
        removed = self.models.activate(
            segmenter, job.kind, req.confirm_frames, req.confirm_timeout_s,
            on_activating=lambda: job.request.progress(stage="activating", **job.fields),
            cancelled=job.cancelled)
        log.info("%s %s: now running %s (%s)", job.kind, job.id, req.name, req.sha256[:12])
        return {"state": final, "pruned": removed or None}

    def _progress_reporter(self, job: _Job, total: int) -> Callable[[int], None]:
        throttle = Throttle(PROGRESS_INTERVAL_S)

        def report(received: int) -> None:
            if throttle.ready():
                job.request.progress(stage="downloading", received=received, total=total)
        return report

    def _running_sha(self) -> Optional[str]:
        return self.models.running_sha()

    # -- what the agent tells in info ----------------------------------------------------------
    def info(self, doc: Dict[str, Any]) -> Dict[str, Any]:
        """``info.deploy``: the store's pointers (the model manager's) and whether signing is on."""
        doc["deploy"] = {**self.models.pointers(),
                         "signing": "required" if self.public_key is not None else "off"}
        return doc
