"""The one owner of the running model: which model runs, the model store, swap, confirm and undo.

Everything that changes the running model goes through :class:`ModelManager`: the agent loads
its start-up model here (the store's current model, else the configured one; if a stored model
no longer loads, the configured one), a deployment or rollback hands it a checked segmenter to
activate (swap between two frames, pointers moved with a ``pending`` marker, confirmed on real
frames or swapped back), and the remote benchmark asks it for models by name. Nobody else writes
the running segmenter, the store's pointers or the agent's error.

The store is opened (and repaired: an unconfirmed deployment left by a crash is rolled back, see
:mod:`edge_agent.models.store`) by :meth:`ModelManager.open_store`, before the first model load.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any, Callable, Dict, List, Optional, Protocol, Tuple

from edge_agent.errors import EdgeAgentError
from edge_agent.inference.segmenter import ModelSettings, Segmenter
from edge_agent.models import catalog
from edge_agent.models.store import ModelStore

log = logging.getLogger(__name__)

Model = Tuple[str, Optional[List[str]]]  # path, labels


class ActivationFailed(EdgeAgentError):
    """The new model was swapped in but did not prove itself: the old one runs again."""


class PipelineHost(Protocol):
    """What the manager needs from the agent: its pipeline, to start/stop one, to re-publish info."""

    pipeline: Any
    error: Optional[str]

    def start_pipeline(self, segmenter: Optional[Segmenter] = None) -> None: ...

    def stop_pipeline(self, reason: Optional[str] = None) -> None: ...

    def publish_info(self) -> None: ...


class ModelManager:
    def __init__(self, config: Any, host: PipelineHost) -> None:
        self.config = config
        self._host = host
        self.store: Optional[ModelStore] = None
        self._running: Optional[Segmenter] = None

    # -- configuration --------------------------------------------------------------------------
    @property
    def settings(self) -> ModelSettings:
        return ModelSettings.from_config(self.config.model)

    def set_config(self, config: Any) -> None:
        """A reloaded config: the next :meth:`load` and :meth:`build` use it."""
        self.config = config

    def open_store(self) -> Optional[ModelStore]:
        """Open and repair the store (rolls back an unconfirmed deployment); None if unusable."""
        cfg = self.config
        try:
            self.store = ModelStore.open(cfg.agent.state_dir, cfg.deploy.keep_models)
        except (EdgeAgentError, OSError) as exc:  # the agent must serve its configured model anyway
            log.error("model deployment disabled: the model store in %s is unusable (%s)",
                      cfg.agent.state_dir, exc)
            self.store = None
        return self.store

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
            log.info("running %s (%s) from the model store", entry.name, sha[:12])
            return str(entry.path), entry.labels
        return self.configured()

    def find(self, name: str) -> Model:
        """A model named over the network: store name/sha256 or manifest name, never a path."""
        resolved = catalog.resolve(name, store=self.store, allow_paths=False)
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
                 on_activating: Callable[[], None] = lambda: None) -> List[str]:
        """Swap ``segmenter`` in, move the store's pointers with a pending marker, confirm it on
        ``confirm_frames`` real frames, prune; on any problem undo everything and raise
        :class:`ActivationFailed`. Returns the pruned sha256s."""
        store = self._require_store()
        sha = segmenter.model.file.sha256
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
        problem = self._await_confirm(host.pipeline, confirm_frames, confirm_timeout_s)
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

    def _await_confirm(self, pipeline: Any, frames: int, timeout_s: float) -> Optional[str]:
        """None once ``frames`` frames went through the new model; else why not."""
        counters = pipeline.counters
        ok0, errors0 = counters.inferred, counters.inference_errors
        deadline = time.monotonic() + timeout_s
        limit = self.config.model.inference_timeout_s
        while counters.inferred - ok0 < frames:
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
        """First deployment: put the configured model into the store so a rollback can reach it."""
        store = self._require_store()
        seg = self._running
        if store.current() is not None or seg is None:
            return
        path = seg.model.file.path
        entry = store.adopt(path, {"name": seg.model.file.name, "labels": seg.labels,
                                   "input_size": list(seg.model.input_size), "source": f"config:{path}"})
        store.set_pointers(entry.sha256, None)

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
