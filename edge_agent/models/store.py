"""The on-device model store: deployed models by sha256, and which one runs.

Layout of ``<state_dir>/models/``::

    <sha256>.tflite    the model, exactly the bytes that were verified
    <sha256>.json      its manifest (name, labels, input size, source, deploy time, size, and the
                       base64 ed25519 ``signature`` it was deployed with: checked again whenever
                       it is to become current, see ModelManager.trust_problem)
    current            sha256 of the model the agent runs (one line)
    previous           sha256 of the model before it (target of a rollback)
    pending.json       a model swapped in but not yet confirmed healthy
    .incoming-*.part   a transfer in progress (removed at startup: never a model)

Why this shape: every change is a single ``os.replace`` of a fully written and fsynced file, so
a power cut or SIGKILL at any instant leaves either the old state or the new one.  A ``.tflite``
becomes part of the store only when its manifest exists (the manifest is written last); a
``.tflite`` without one is the remains of an interrupted deployment and is deleted by
:meth:`ModelStore.recover`.  ``pending.json`` is written *before* the pointers move to a new
model and removed once enough frames went through it: if the agent dies (crash, stall, watchdog
kill) in between, the next start finds it and moves the pointers back.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

from edge_agent.models.catalog import sha256_file
from edge_agent.errors import EdgeAgentError

log = logging.getLogger(__name__)

MODELS_SUBDIR = "models"
CURRENT = "current"
PREVIOUS = "previous"
PENDING = "pending.json"
INCOMING_PREFIX = ".incoming-"
TEMP_PREFIX = ".tmp-"
_HEX = set("0123456789abcdef")


class StoreError(EdgeAgentError):
    """The model store cannot be read or written (disk full, permissions, bad sha256)."""


def is_sha256(text: Any) -> bool:
    return isinstance(text, str) and len(text) == 64 and set(text) <= _HEX



def fsync_dir(directory: Path) -> None:
    """Make a rename/unlink in ``directory`` durable (no-op where directories can't be opened)."""
    try:
        fd = os.open(str(directory), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the old content or the new, never a mix."""
    fd, tmp = tempfile.mkstemp(prefix=f"{TEMP_PREFIX}{path.name}.", dir=str(path.parent))
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        _unlink(Path(tmp))
        raise
    fsync_dir(path.parent)


def _unlink(path: Path) -> bool:
    try:
        path.unlink()
        return True
    except FileNotFoundError:
        return False


@dataclass
class StoredModel:
    """One complete entry of the store (its ``.tflite`` and its manifest)."""

    sha256: str
    path: Path
    manifest: Dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return str(self.manifest.get("name") or self.sha256[:12])

    @property
    def labels(self) -> Optional[List[str]]:
        labels = self.manifest.get("labels")
        return list(labels) if labels else None

    @property
    def deployed_at(self) -> float:
        return float(self.manifest.get("deployed_at") or 0.0)


class ModelStore:
    """Models by sha256 in one directory, plus atomically replaced ``current``/``previous`` pointers.

    Not thread-safe by itself: the deployer serialises changes (one deployment at a time).
    """

    def __init__(self, root: Path, keep: int = 3) -> None:
        self.root = Path(root)
        self.keep = max(1, int(keep))

    @classmethod
    def open(cls, state_dir: str, keep: int = 3) -> "ModelStore":
        """The store under ``state_dir``, created if needed and made consistent (see :meth:`recover`)."""
        store = cls(Path(state_dir) / MODELS_SUBDIR, keep)
        try:
            store.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreError(f"cannot create the model store {store.root}: {exc.strerror}") from exc
        try:
            actions = store.recover()
        except OSError as exc:  # e.g. a read-only state directory holding an interrupted deployment
            raise StoreError(f"cannot repair the model store {store.root}: {exc.strerror}") from exc
        for action in actions:
            log.warning("model store: %s", action)
        return store

    # -- paths -----------------------------------------------------------------------------------
    def model_path(self, sha: str) -> Path:
        self._check_sha(sha)
        return self.root / f"{sha}.tflite"

    def manifest_path(self, sha: str) -> Path:
        self._check_sha(sha)
        return self.root / f"{sha}.json"

    @staticmethod
    def _check_sha(sha: str) -> None:
        if not is_sha256(sha):
            raise StoreError(f"invalid sha256 {sha!r}: 64 lowercase hex digits expected")

    def check_writable(self) -> None:
        """Raise OSError (EROFS, EACCES, ENOSPC...) unless a file can be created in the store now."""
        fd, tmp = tempfile.mkstemp(prefix=TEMP_PREFIX, dir=str(self.root))
        os.close(fd)
        _unlink(Path(tmp))

    def incoming_file(self, tag: str) -> Path:
        """A fresh temporary file for a transfer (deleted by :meth:`recover` if left behind)."""
        safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in tag)[:64]
        fd, tmp = tempfile.mkstemp(prefix=f"{INCOMING_PREFIX}{safe}.", suffix=".part", dir=str(self.root))
        os.close(fd)
        return Path(tmp)

    # -- entries ---------------------------------------------------------------------------------
    def has(self, sha: str) -> bool:
        return is_sha256(sha) and self.model_path(sha).is_file() and self.manifest_path(sha).is_file()

    def get(self, sha: str) -> StoredModel:
        if not self.has(sha):
            raise StoreError(f"model {sha[:12]} is not in the store")
        return StoredModel(sha, self.model_path(sha), self._read_manifest(sha))

    def entries(self) -> List[StoredModel]:
        """Complete entries, oldest deployment first."""
        out = [self.get(p.stem) for p in self.root.glob("*.tflite") if self.has(p.stem)]
        return sorted(out, key=lambda e: (e.deployed_at, e.sha256))

    def find(self, key: str) -> Optional[StoredModel]:
        """The newest entry named ``key`` (any case) or whose sha256 is ``key`` or starts with it
        (>= 8 hex digits); None if none. The store's half of ``catalog.resolve``'s one rule."""
        key = key.lower()
        for entry in reversed(self.entries()):
            if key in (entry.sha256, entry.name.lower()) or (len(key) >= 8 and entry.sha256.startswith(key)):
                return entry
        return None

    def _read_manifest(self, sha: str) -> Dict[str, Any]:
        try:
            doc = json.loads(self.manifest_path(sha).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}
        return doc if isinstance(doc, dict) else {}

    def place(self, temp: Path, sha: str) -> bool:
        """Move a verified temporary file to ``<sha>.tflite``; False if that model was already there.

        No manifest yet: until :meth:`write_manifest` the file is not part of the store, so a crash
        in between leaves nothing that :meth:`recover` would keep.
        """
        target = self.model_path(sha)
        if self.has(sha):
            _unlink(temp)
            return False
        with open(temp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(temp, target)
        fsync_dir(self.root)
        return True

    def write_manifest(self, sha: str, manifest: Dict[str, Any]) -> StoredModel:
        doc = dict(manifest)
        doc["sha256"] = sha
        doc.setdefault("deployed_at", round(time.time(), 3))
        doc.setdefault("size", self.model_path(sha).stat().st_size)
        atomic_write(self.manifest_path(sha), json.dumps(doc, indent=1, sort_keys=True).encode())
        return StoredModel(sha, self.model_path(sha), doc)

    def update_manifest(self, sha: str, **changes: Any) -> None:
        if self.has(sha):
            doc = self._read_manifest(sha)
            doc.update(changes)
            atomic_write(self.manifest_path(sha), json.dumps(doc, indent=1, sort_keys=True).encode())

    def adopt(self, path: str, manifest: Dict[str, Any]) -> StoredModel:
        """Copy a model from outside (the configured one) into the store, so it can be rolled back to."""
        temp = self.incoming_file("adopt")
        try:
            shutil.copyfile(path, temp)
            sha = sha256_file(temp)
            if self.has(sha):
                _unlink(temp)
                return self.get(sha)
            self.place(temp, sha)
        except OSError as exc:
            _unlink(temp)
            raise StoreError(f"cannot copy {path} into the model store: {exc}") from exc
        return self.write_manifest(sha, manifest)

    def discard(self, sha: str) -> bool:
        """Delete an entry (or a placed file without manifest) unless a pointer refers to it."""
        if sha in self.protected():
            return False
        removed = _unlink(self.manifest_path(sha))  # manifest first: the entry stops existing
        removed = _unlink(self.model_path(sha)) or removed
        if removed:
            fsync_dir(self.root)
        return removed

    # -- pointers --------------------------------------------------------------------------------
    def _read_pointer(self, name: str) -> Optional[str]:
        try:
            text = (self.root / name).read_text(encoding="ascii").strip()
        except (OSError, UnicodeDecodeError):
            return None
        return text if is_sha256(text) else None

    def _write_pointer(self, name: str, sha: Optional[str]) -> None:
        if sha is None:
            if _unlink(self.root / name):
                fsync_dir(self.root)
            return
        self._check_sha(sha)
        atomic_write(self.root / name, f"{sha}\n".encode("ascii"))

    def current(self) -> Optional[str]:
        return self._read_pointer(CURRENT)

    def previous(self) -> Optional[str]:
        return self._read_pointer(PREVIOUS)

    def pending(self) -> Optional[Dict[str, Any]]:
        try:
            doc = json.loads((self.root / PENDING).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        return doc if isinstance(doc, dict) and is_sha256(doc.get("sha256")) else None

    def protected(self) -> set:
        """Entries that pruning or discarding must never remove."""
        keep = {self.current(), self.previous()}
        pending = self.pending()
        if pending:
            keep |= {pending.get("sha256"), pending.get("current"), pending.get("previous")}
        return {s for s in keep if s}

    def set_pointers(self, current: Optional[str], previous: Optional[str]) -> None:
        """previous first: at every instant ``current`` names a model that was running."""
        self._write_pointer(PREVIOUS, previous)
        self._write_pointer(CURRENT, current)

    def begin_switch(self, new: str, reason: str = "deploy") -> None:
        """Point ``current`` at ``new`` with a pending marker; :meth:`confirm` or a restart ends it."""
        if not self.has(new):
            raise StoreError(f"model {new[:12]} is not in the store")
        old_current, old_previous = self.current(), self.previous()
        marker = {"sha256": new, "current": old_current, "previous": old_previous,
                  "since": round(time.time(), 3), "reason": reason}
        atomic_write(self.root / PENDING, json.dumps(marker).encode())
        self.set_pointers(new, old_current if old_current != new else old_previous)

    def confirm(self) -> Optional[str]:
        """The pending model proved healthy: drop the marker; returns its sha256."""
        pending = self.pending()
        if _unlink(self.root / PENDING):
            fsync_dir(self.root)
        return pending.get("sha256") if pending else None

    def rollback_pending(self, reason: str) -> Optional[str]:
        """Restore the pointers saved in the pending marker; returns the sha256 that was rolled back."""
        pending = self.pending()
        if pending is None:
            _unlink(self.root / PENDING)
            return None
        bad = pending["sha256"]
        restore = [s if is_sha256(s) and self.has(s) else None
                   for s in (pending.get("current"), pending.get("previous"))]
        self.set_pointers(*restore)
        self.update_manifest(bad, rolled_back_at=round(time.time(), 3), rolled_back_reason=reason)
        if _unlink(self.root / PENDING):
            fsync_dir(self.root)
        return bad

    # -- housekeeping ----------------------------------------------------------------------------
    def prune(self, keep: Optional[int] = None) -> List[str]:
        """Delete the oldest entries beyond ``keep`` (never current/previous/pending); returns them."""
        keep = self.keep if keep is None else max(1, keep)
        protected = self.protected()
        entries = self.entries()
        removed: List[str] = []
        excess = len(entries) - keep
        for entry in entries:  # oldest first
            if excess <= 0:
                break
            if entry.sha256 in protected:
                continue
            if self.discard(entry.sha256):
                removed.append(entry.sha256)
                excess -= 1
        return removed

    def recover(self, verify_hashes: bool = True) -> List[str]:
        """Make the store consistent after any interruption; returns what was done (for the log).

        Removes temporary and incoming files, model files without a manifest (interrupted
        deployments), manifests without a model, entries whose bytes don't match their name,
        rolls back an unconfirmed ``pending`` switch and clears pointers to missing entries.
        """
        actions: List[str] = []
        for path in sorted(self.root.iterdir()):
            name = path.name
            if name.startswith((INCOMING_PREFIX, TEMP_PREFIX)):
                _unlink(path)
                actions.append(f"removed the unfinished file {name}")
            elif name.endswith(".tflite") and not (self.root / f"{path.stem}.json").is_file():
                _unlink(path)
                actions.append(f"removed {name}: its deployment never completed")
            elif name.endswith(".json") and name != PENDING and not (self.root / f"{path.stem}.tflite").is_file():
                _unlink(path)
                actions.append(f"removed the manifest {name}: its model file is missing")
        if verify_hashes:
            for path in sorted(self.root.glob("*.tflite")):
                if not is_sha256(path.stem) or sha256_file(path) != path.stem:
                    _unlink(self.root / f"{path.stem}.json")
                    _unlink(path)
                    actions.append(f"removed {path.name}: its content does not match its sha256")
        pending = self.pending()
        if pending is not None:
            bad = self.rollback_pending("not confirmed healthy before the agent stopped")
            actions.append(f"rolled back the unconfirmed model {bad[:12] if bad else '?'}")
        elif (self.root / PENDING).exists():
            _unlink(self.root / PENDING)
            actions.append("removed an unreadable pending marker")
        current, previous = self.current(), self.previous()
        if current is not None and not self.has(current):
            current, previous = (previous if previous and self.has(previous) else None), None
            actions.append("the current model was missing: pointer moved back")
        if previous is not None and not self.has(previous):
            previous = None
            actions.append("the previous model was missing: pointer cleared")
        stale = [n for n in (CURRENT, PREVIOUS) if (self.root / n).exists() and self._read_pointer(n) is None]
        actions += [f"removed the unreadable pointer {n}" for n in stale]
        if stale or (current, previous) != (self.current(), self.previous()):
            self.set_pointers(current, previous)
        if actions:
            fsync_dir(self.root)
        return actions

    def describe(self) -> Dict[str, Any]:
        """What ``cmd/models`` answers: every entry with its role."""
        current, previous, pending = self.current(), self.previous(), self.pending()
        roles = {current: "current", previous: "previous"}
        models = []
        for entry in reversed(self.entries()):  # newest first
            doc = {k: entry.manifest.get(k) for k in ("name", "size", "input_size", "labels", "source",
                                                     "deployed_at", "rolled_back_reason")}
            doc["labels"] = len(doc["labels"]) if doc["labels"] else None
            doc.update(sha256=entry.sha256, role=roles.get(entry.sha256),
                       pending=bool(pending and pending.get("sha256") == entry.sha256))
            models.append(doc)
        return {"current": current, "previous": previous, "pending": pending.get("sha256") if pending else None,
                "keep": self.keep, "models": models}
