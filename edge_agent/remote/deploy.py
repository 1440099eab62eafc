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

The parts, one module each: the request schemas and cross-field rules
(:mod:`~edge_agent.remote.deploy_request`), receiving and verifying the bytes
(:mod:`~edge_agent.remote.transfer`), the sanity invoke (:mod:`~edge_agent.remote.sanity`); this
module is the deployer that runs them in order and answers.
"""

from __future__ import annotations

import base64
import logging
import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple

from edge_agent.config import mask_url_secrets
from edge_agent.comms.commands import CommandChannel, Request, RequestError
from edge_agent.system import release_memory
from edge_agent.errors import EdgeAgentError
from edge_agent.inference.segmenter import Segmenter
from edge_agent.models import catalog, signing
from edge_agent.models.store import ModelStore, StoredModel
from edge_agent.output.throttle import Throttle
from edge_agent.remote.context import HandlerContext, Route
from edge_agent.remote.deploy_request import (DEPLOY_SCHEMA, MAX_REQUEST_BYTES, MODELS_SCHEMA, ROLLBACK_SCHEMA,
                                             Cancelled, DeployFailed, DeployRequest, deploy_request)
from edge_agent.remote.transfer import ChunkAssembler, fetch_url, storage_problem, verify_file
from edge_agent.remote.sanity import run_with_timeout, sanity_check

log = logging.getLogger(__name__)

KIND = "deploy"  # answers of cmd/deploy and cmd/rollback: deploy/<request_id>
MODELS_KIND = "models"
PROGRESS_INTERVAL_S = 1.0  # at most one progress answer a second
MAX_CHUNK_DIGITS = 9
_CHUNK_NUMBER = re.compile(r"[0-9]{1,%d}" % MAX_CHUNK_DIGITS)


# -- receiving the bytes ---------------------------------------------------------------------------


# -- checking the model ----------------------------------------------------------------------------


# -- the agent side ----------------------------------------------------------------------------------

def signed_document(req: DeployRequest) -> Dict[str, Any]:
    """What a deployment's signature must cover (:func:`signing.deployment_document`)."""
    return signing.deployment_document(req.sha256, req.name, req.labels, req.sample, req.golden_mask)


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
            return
        remove = request.params.get("remove")
        if remove:  # a staged model (deploy with activate: false) that is no longer needed
            try:
                self._remove(store, remove)
            except (RequestError, EdgeAgentError, OSError) as exc:
                request.reject(str(exc), running=self._running_sha())
                return
        request.done(running=self._running_sha(), **({"removed": remove} if remove else {}), **store.describe())

    def _remove(self, store: ModelStore, sha: str) -> None:
        with self._lock:  # never while a job places or loads an entry
            if self._job is not None:
                raise RequestError(f"busy: {self._job.kind} {self._job.id} is in progress")
            if not store.has(sha):
                raise RequestError(f"no model {sha[:12]} in the store")
            if sha in store.protected() or sha == self._running_sha():
                raise RequestError(f"model {sha[:12]} is current, previous, pending or running: not removed")
            store.check_writable()
            store.discard(sha)
        log.info("models: removed %s from the store", sha[:12])

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
        signing.verify_deployment(self.public_key, signed_document(req), req.signature)

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
        if _CHUNK_NUMBER.fullmatch(number) is None:  # ASCII digits only: str.isdigit takes '²', '١'
            reason = f"bad chunk number {number[:20]!r}: expected 0..{MAX_CHUNK_DIGITS * '9'} in ASCII digits"
            log.warning("deploy %s: %s", rid, reason)
            job.assembler.fail(reason)
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
            # what the signature covers, kept with it: every later trust check verifies the same document
            signed = signed_document(req) if signature else None
            store.write_manifest(req.sha256, {  # a re-deployment refreshes it (and its signature)
                "name": req.name, "labels": segmenter.labels, "input_size": list(segmenter.model.input_size),
                "source": mask_url_secrets(req.url) if req.url else "mqtt", "request_id": req.id, "deployed_at": round(time.time(), 3),
                "size": req.size, "signature": signature, "signed_document": signed,
                "signed": bool(req.signature and self.public_key is not None)})
        except BaseException:
            if placed:
                store.discard(req.sha256)
            raise
        if not req.activate:  # staged: in the store (cmd/benchmark can name it), not current
            del segmenter
            return {"state": "staged"}
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
