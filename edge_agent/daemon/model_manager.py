"""The one owner of the running model: which model runs, the model store, swap, confirm and undo.

Everything that changes the running model goes through :class:`ModelManager`: the agent loads
its start-up model here (the store's current model, else the configured one; if a stored model
no longer loads, the configured one), a deployment or rollback hands it a checked segmenter to
activate (swap between two frames, pointers moved with a ``pending`` marker, confirmed on real
frames or swapped back), and the remote benchmark asks it for models by name. Nobody else writes
the running segmenter, the store's pointers or the agent's error.

The store is opened (and repaired: an unconfirmed deployment left by a crash is rolled back, see
:mod:`edge_agent.models.store`) by :meth:`ModelManager.open_store`, before the first model load.

Signing: with ``deploy.public_key`` set, a stored model becomes the running one (start-up,
recovery, deploy, rollback) only if the signature kept in its store entry verifies, or if it is
the configured model (trusted by the same config that holds the key); see :meth:`trust_problem`.
The same rule holds for a model loaded on request (the remote benchmark, :meth:`find`): with a key,
no unsigned model is ever loaded.
"""

from __future__ import annotations

import base64
import logging
import os
import time
from typing import Any, Callable, Dict, List, Optional, Protocol, Tuple

from edge_agent.comms.commands import public_reason
from edge_agent.config import Config
from edge_agent.errors import EdgeAgentError
from edge_agent.inference.segmenter import ModelSettings, Segmenter
from edge_agent.models import catalog, signing
from edge_agent.models.store import ModelStore, StoredModel

log = logging.getLogger(__name__)

Model = Tuple[str, Optional[List[str]]]  # path, labels


class ActivationFailed(EdgeAgentError):
    """The new model was swapped in but did not prove itself: the old one runs again."""


class Untrusted(EdgeAgentError):
    """A stored model whose signature does not verify with ``deploy.public_key``: never made current."""


class PipelineHost(Protocol):
    """What the manager needs from the agent: its pipeline, to start/stop one, to re-publish info."""

    pipeline: Any
    error: Optional[str]

    def start_pipeline(self, segmenter: Optional[Segmenter] = None) -> None: ...

    def stop_pipeline(self, reason: Optional[str] = None) -> None: ...

    def publish_info(self) -> None: ...


class ModelManager:
    def __init__(self, config: Config, host: PipelineHost) -> None:
        self.config = config
        self._host = host
        self.store: Optional[ModelStore] = None
        self.store_problem: Optional[str] = None  # why deployments are disabled (None: they are not)
        self._running: Optional[Segmenter] = None
        self.public_key: Any = None
        self.key_problem: Optional[str] = None
        self._configured_sha: Optional[Tuple[str, str]] = None  # (path, sha256) cache
        self.load_key()

    # -- configuration --------------------------------------------------------------------------
    @property
    def settings(self) -> ModelSettings:
        return ModelSettings.from_config(self.config.model)

    def set_config(self, config: Config) -> None:
        """A reloaded config: the next :meth:`load` and :meth:`build` use it."""
        self.config = config
        self.load_key()

    def load_key(self) -> None:
        """``deploy.public_key`` as a verifier; a key that does not load refuses every stored model."""
        self.public_key, self.key_problem = None, None
        spec = getattr(getattr(self.config, "deploy", None), "public_key", "")
        if spec:
            try:
                self.public_key = signing.load_public_key(spec)
            except EdgeAgentError as exc:
                self.key_problem = str(exc)
                log.error("deployments are refused until fixed: %s", exc)

    def open_store(self) -> Optional[ModelStore]:
        """Open and repair the store (rolls back an unconfirmed deployment); None if unusable.

        ``store_problem`` says why deployments cannot work (unusable or read-only store)."""
        cfg = self.config
        self.store_problem = None
        try:
            self.store = ModelStore.open(cfg.agent.state_dir, cfg.deploy.keep_models)
        except (EdgeAgentError, OSError) as exc:  # the agent must serve its configured model anyway
            # published (info, answers): no local path; the log has it for the operator
            self.store_problem = public_reason(f"the model store is unusable ({exc}; agent.state_dir)")
            log.error("model deployment disabled: the model store in %s is unusable (%s; agent.state_dir)",
                      cfg.agent.state_dir, exc)
            self.store = None
        return self.store

    # -- trust (deploy.public_key) ----------------------------------------------------------------
    def trust_problem(self, entry: StoredModel) -> Optional[str]:
        """None if ``entry`` may become the running model; else why not (one line).

        Without a key every model may run. With one, the signature kept in the entry's manifest
        must verify over the document kept with it (``signed_document``: sha256, name, labels,
        sample; :mod:`edge_agent.models.signing`), and that document must describe the entry
        (same sha256 and name; the same labels when it names them), unless the entry is the
        configured model (the config is the root of trust). A signature of the raw digest alone
        (older agents) is refused, saying to re-sign."""
        if self.key_problem is not None:
            return f"deploy.public_key is unusable: {self.key_problem}"
        if self.public_key is None or entry.sha256 == self.configured_sha():
            return None
        signature = entry.manifest.get("signature")
        if not isinstance(signature, str) or not signature:
            return (f"model {entry.name} ({entry.sha256[:12]}) has no signature, and deploy.public_key "
                    "is configured: only signed models may run")
        kept = entry.manifest.get("signed_document")
        document = kept if isinstance(kept, dict) else signing.deployment_document(
            entry.sha256, entry.name, entry.labels)
        try:
            signing.verify_deployment(self.public_key, document, base64.b64decode(signature, validate=True))
        except signing.SigningError as exc:
            if "re-sign" in str(exc):
                return f"model {entry.name} ({entry.sha256[:12]}): {exc}"
            return (f"model {entry.name} ({entry.sha256[:12]}): its signature does not verify with "
                    "deploy.public_key")
        except (EdgeAgentError, ValueError):
            return (f"model {entry.name} ({entry.sha256[:12]}): its signature does not verify with "
                    "deploy.public_key")
        labels = document.get("labels")
        if (document.get("sha256") != entry.sha256 or document.get("name") != entry.name
                or (labels is not None and list(labels) != (entry.labels or []))):
            return (f"model {entry.name} ({entry.sha256[:12]}): its store entry does not match what was "
                    "signed (sha256, name or labels changed)")
        return None

    def configured_sha(self) -> Optional[str]:
        """sha256 of the configured model's file (None if it cannot be resolved or read)."""
        try:
            path = self.configured()[0]
        except EdgeAgentError:
            return None
        cached = self._configured_sha
        if cached is None or cached[0] != path:
            try:
                cached = (path, catalog.sha256_file(path))
            except OSError:
                return None
            self._configured_sha = cached
        return cached[1]

    # -- resolving and building -----------------------------------------------------------------
    def configured(self) -> Model:
        """``model.path``, else ``model.name`` from the manifest (fetched and verified into
        ``<state_dir>/catalog`` on first start, then offline); ``model.labels`` wins."""
        m = self.config.model
        if not (m.path or m.name):
            raise EdgeAgentError("no model configured: set model.path or model.name")
        if m.path:
            resolved = catalog.resolve(m.path)
        else:
            dest = os.environ.get(catalog.ENV_MODELS_DIR) or os.path.join(self.config.agent.state_dir, "catalog")
            resolved = catalog.resolve(m.name, dest, fetch_missing=True, mirror=m.mirror or None)
        return resolved.path, (m.labels or resolved.labels)

    def startup_model(self) -> Model:
        """The store's current model when there is one, else the configured one."""
        store = self.store
        sha = store.current() if store is not None else None
        if store is not None and sha is not None and store.has(sha):
            entry = store.get(sha)
            problem = self.trust_problem(entry)
            if problem is None:
                log.info("running %s (%s) from the model store", entry.name, sha[:12])
                return str(entry.path), entry.labels
            log.error("the store's current model is refused: %s; running the configured model", problem)
        return self.configured()

    def find(self, name: str) -> Model:
        """A model named over the network: store name/sha256 or manifest name, never a path.

        With ``deploy.public_key`` set, the same rule as every path to current holds for anything
        loaded on request (the remote benchmark): a store entry must pass :meth:`trust_problem`;
        any other model only if it is the configured one (sha256), else :class:`Untrusted`."""
        store = self.store
        hit = store.find(name) if store is not None else None
        if hit is not None:
            problem = self.trust_problem(hit)
            if problem is not None:
                raise Untrusted(f"refused: {problem}")
            return str(hit.path), hit.labels
        resolved = catalog.resolve(name, store=store, allow_paths=False)
        if self.key_problem is not None:
            raise Untrusted(f"refused: deploy.public_key is unusable: {self.key_problem}")
        if self.public_key is not None:
            try:
                sha = catalog.sha256_file(resolved.path)
            except OSError as exc:
                raise Untrusted(f"refused: model '{name}' cannot be read ({exc.strerror})") from None
            if sha != self.configured_sha():
                raise Untrusted(f"refused: model '{name}' ({sha[:12]}) is not signed, and deploy.public_key is "
                                "configured: only signed models (deployed with a signature) and the "
                                "configured model may be loaded")
        return resolved.path, resolved.labels

    def build(self, path: str, labels: Any, **changes: Any) -> Segmenter:
        """A segmenter with the configured runtime settings (``changes`` override some)."""
        return Segmenter.from_settings(path, labels, self.settings.replace(**changes))

    # -- the running model ----------------------------------------------------------------------
    @property
    def running(self) -> Optional[Segmenter]:
        return self._running

    def running_sha(self) -> Optional[str]:
        seg = self._running
        return seg.model.file.sha256 if seg is not None else None

    def running_model(self) -> Model:
        """Path and labels of the running model (or of the one that would start; raises its problem)."""
        seg = self._running
        if seg is not None:
            return seg.model.path, seg.labels
        return self.startup_model()

    def load(self) -> Segmenter:
        """Load the start-up model and make it the running one; if a stored model cannot run any
        more (a runtime upgrade, a lost delegate), the configured model instead of none at all."""
        self._running = None
        path, labels = self.startup_model()
        try:
            self._running = self.build(path, labels)
        except EdgeAgentError as exc:
            fallback_path, fallback_labels = self.configured()
            if os.path.realpath(fallback_path) == os.path.realpath(path):
                raise
            log.error("%s; falling back to the configured model %s", exc, fallback_path)
            self._running = self.build(fallback_path, fallback_labels)
        return self._running

    def swap(self, new: Optional[Segmenter]) -> Optional[Segmenter]:
        """Make ``new`` the running model (between two frames when a pipeline runs); the old one."""
        old = self._running
        pipeline = self._host.pipeline
        if pipeline is not None and new is not None:
            pipeline.swap_segmenter(new)
        self._running = new
        return old

    # -- activation with confirmation (deploy, rollback) ----------------------------------------
    def activate(self, segmenter: Segmenter, reason: str, confirm_frames: int, confirm_timeout_s: float,
                 on_activating: Callable[[], None] = lambda: None,
                 cancelled: Callable[[], Optional[str]] = lambda: None) -> List[str]:
        """Swap ``segmenter`` in, move the store's pointers with a pending marker, confirm it on
        ``confirm_frames`` real frames, prune; on any problem undo everything and raise
        :class:`ActivationFailed`. Returns the pruned sha256s. A stored model whose signature does
        not verify (:meth:`trust_problem`) raises :class:`Untrusted` before anything moves;
        ``cancelled()`` returning a reason (the agent stopping) undoes the swap too."""
        store = self._require_store()
        sha = segmenter.model.file.sha256
        problem = self.trust_problem(store.get(sha))
        if problem is not None:
            raise Untrusted(problem)
        self.adopt_running()
        old_pointers = (store.current(), store.previous())
        store.begin_switch(sha, reason=reason)
        on_activating()
        host = self._host
        old = self._running
        if host.pipeline is not None:
            self.swap(segmenter)
        else:  # idle agent (its configured model or source failed): start on the new model
            self._running = segmenter
            host.start_pipeline(segmenter)
            if host.pipeline is None:
                self._undo(None, old_pointers, f"cannot start: {host.error}")
                raise ActivationFailed(f"the pipeline does not start: {host.error}")
            old = None
        host.publish_info()
        problem = self._await_confirm(host.pipeline, confirm_frames, confirm_timeout_s, cancelled)
        if problem is not None:
            self._undo(old, old_pointers, problem)
            raise ActivationFailed(f"rolled back after the swap: {problem}")
        store.confirm()
        removed = store.prune()
        host.publish_info()
        return removed

    def _undo(self, old: Optional[Segmenter], pointers: Tuple[Optional[str], Optional[str]], reason: str) -> None:
        store = self._require_store()
        if self._host.pipeline is not None and old is not None:
            self.swap(old)
        elif self._host.pipeline is not None:  # the agent was idle before: idle again, saying why
            self._host.stop_pipeline(f"deployed model rolled back: {reason}")
            self._running = None
        store.rollback_pending(reason)
        store.set_pointers(*pointers)
        self._host.publish_info()

    def _await_confirm(self, pipeline: Any, frames: int, timeout_s: float,
                       cancelled: Callable[[], Optional[str]]) -> Optional[str]:
        """None once ``frames`` frames went through the new model; else why not."""
        counters = pipeline.counters
        ok0, errors0 = counters.inferred, counters.inference_errors
        deadline = time.monotonic() + timeout_s
        limit = self.config.model.inference_timeout_s
        while counters.inferred - ok0 < frames:
            stop = cancelled()
            if stop is not None:
                return f"{stop} before {frames} frames confirmed the new model"
            if counters.inference_errors - errors0 >= max(1, frames):
                return f"inference fails on the new model ({counters.last_error})"
            if not pipeline.healthy(limit):
                return f"the pipeline is unhealthy on the new model ({counters.last_error or 'inference stuck'})"
            if time.monotonic() > deadline:
                return (f"only {counters.inferred - ok0} of {frames} frames processed within "
                        f"{timeout_s:g} s of the swap")
            time.sleep(0.02)
        return None

    def adopt_running(self) -> None:
        """Before a switch, ``current`` must name the running model: on the first deployment, or
        after the start-up refused or could not load the store's current model and runs the
        configured one, that one is put into the store (so a rollback can reach it) and made current."""
        store = self._require_store()
        seg = self._running
        if seg is None or store.current() == seg.model.file.sha256:
            return
        path = seg.model.file.path
        entry = store.adopt(path, {"name": seg.model.file.name, "labels": seg.labels,
                                   "input_size": list(seg.model.input_size), "source": f"config:{path}"})
        store.set_pointers(entry.sha256, store.previous() if store.current() is not None else None)

    def _require_store(self) -> ModelStore:
        if self.store is None:
            raise EdgeAgentError("the model store is unusable: deployments are disabled")
        return self.store

    # -- info -----------------------------------------------------------------------------------
    def info(self, doc: Dict[str, Any]) -> Dict[str, Any]:
        """``info`` with the store's name of the running model."""
        store = self.store
        sha = self.running_sha()
        if store is not None and sha is not None and isinstance(doc.get("model"), dict) and store.has(sha):
            doc["model"]["name"] = store.get(sha).name
        return doc

    def pointers(self) -> Dict[str, Optional[str]]:
        """The store's current, previous and pending sha256s (all None without a store)."""
        store = self.store
        if store is None:
            return {"current": None, "previous": None, "pending": None}
        pending = store.pending()
        return {"current": store.current(), "previous": store.previous(),
                "pending": pending.get("sha256") if pending else None}
