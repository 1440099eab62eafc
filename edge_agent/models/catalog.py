"""The model manifest (``edge_agent/data/manifest.json``) and ``edge-agent models fetch``.

Models are never shipped in the package: they are fetched from their public source and verified
against the manifest's sha256 (or copied from a local mirror directory, for offline tests and
demos). A file whose hash does not match is refused and never left where a model is expected.
"""

from __future__ import annotations

import hashlib
import json
import os
import logging
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

from edge_agent import data
from edge_agent.errors import EdgeAgentError, ModelError

log = logging.getLogger(__name__)

ENV_MANIFEST = "EDGE_AGENT_MANIFEST"
ENV_MODELS_DIR = "EDGE_AGENT_MODELS_DIR"
ENV_MIRROR = "EDGE_AGENT_MODEL_MIRROR"
DOWNLOAD_TIMEOUT_S = 60
MAX_DOWNLOAD_BYTES = 256 * 1024 * 1024


@dataclass
class ModelEntry:
    name: str
    file: str
    url: str
    sha256: str
    size: Optional[int] = None
    input_size: Optional[List[int]] = None
    labels: List[str] = field(default_factory=list)
    edgetpu: bool = False
    cpu_twin: Optional[str] = None
    description: str = ""


@dataclass
class Manifest:
    path: str
    models: Dict[str, ModelEntry]
    default: Optional[str]

    def get(self, name: str) -> ModelEntry:
        try:
            return self.models[name]
        except KeyError:
            raise ModelError(
                f"unknown model '{name}': the manifest {self.path} has {', '.join(self.models)}"
            ) from None


def manifest_candidates() -> List[Path]:
    paths = []
    if os.environ.get(ENV_MANIFEST):
        paths.append(Path(os.environ[ENV_MANIFEST]))
    paths.append(data.path(data.MANIFEST))  # shipped inside the package (checkout and wheel)
    return paths


def load_manifest(path: Optional[str] = None) -> Manifest:
    candidates = [Path(path)] if path else manifest_candidates()
    for candidate in candidates:
        if candidate.is_file():
            return parse_manifest(str(candidate))
    raise EdgeAgentError(f"model manifest not found (looked in {', '.join(map(str, candidates))})")


def parse_manifest(path: str) -> Manifest:
    try:
        with open(path, encoding="utf-8") as fh:
            doc = json.load(fh)
    except (OSError, ValueError) as exc:
        raise EdgeAgentError(f"{path}: cannot read model manifest ({exc})") from exc
    label_sets = doc.get("label_sets", {})
    models = {}
    for raw in doc.get("models", []):
        try:
            labels = raw.get("labels", [])
            if isinstance(labels, str):
                labels = label_sets[labels]
            entry = ModelEntry(
                name=raw["name"], file=raw["file"], url=raw["url"], sha256=raw["sha256"].lower(),
                size=raw.get("size"), input_size=raw.get("input_size"), labels=list(labels),
                edgetpu=bool(raw.get("edgetpu", False)), cpu_twin=raw.get("cpu_twin"),
                description=raw.get("description", ""),
            )
        except (KeyError, TypeError, AttributeError) as exc:
            raise EdgeAgentError(f"{path}: bad manifest entry {raw!r} (missing {exc})") from exc
        models[entry.name] = entry
    return Manifest(path=path, models=models, default=doc.get("default"))


def models_dir(dest: Optional[str] = None) -> Path:
    if dest:
        return Path(dest)
    if os.environ.get(ENV_MODELS_DIR):
        return Path(os.environ[ENV_MODELS_DIR])
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(cache) / "edge-agent" / "models"


def sha256_file(path) -> str:
    """Hex sha256 of a file (str or Path), read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fetch(
    entry: ModelEntry,
    dest: Optional[str] = None,
    mirror: Optional[str] = None,
    force: bool = False,
    progress: Optional[Progress] = None,
) -> Path:
    """Make ``entry`` present and verified in the models dir; return its path.

    ``mirror`` is a local directory holding the files under their manifest names. The file is
    written to a temporary name, verified, then renamed: a wrong hash leaves nothing behind.
    ``progress(done_bytes, total_bytes_or_None)`` is called as the bytes arrive (throttled by the
    caller) and once at the end.
    """
    target_dir = models_dir(dest)
    target = target_dir / entry.file
    if target.is_file() and not force and sha256_file(str(target)) == entry.sha256:
        return target
    mirror = mirror or os.environ.get(ENV_MIRROR)
    target_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{entry.file}.", suffix=".part", dir=str(target_dir))
    try:
        with os.fdopen(fd, "wb") as out:
            if mirror:
                source = Path(mirror) / entry.file
                if not source.is_file():
                    raise ModelError(f"{entry.name}: {source} not found in the mirror directory")
                with open(source, "rb") as src:
                    _copy(src, out, entry.size or source.stat().st_size, progress)
            else:
                _download(entry.url, out, entry.size, progress)
        actual = sha256_file(tmp)
        if actual != entry.sha256:
            raise ModelError(
                f"{entry.name}: sha256 mismatch (expected {entry.sha256}, got {actual}); "
                f"the file was not kept"
            )
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


Progress = Callable[[int, Optional[int]], None]


class ProgressLog:
    """Download progress as text: one line at most every ``every_s`` seconds, and the last one.

    For logs and pipes (the daemon's first fetch, ``models fetch`` without a terminal); on a
    terminal the CLI passes ``overwrite=True`` and the line is redrawn in place.
    """

    def __init__(self, name: str, emit: Callable[[str], Any], every_s: float = 2.0,
                 overwrite: bool = False, clock: Callable[[], float] = time.monotonic) -> None:
        self.name, self.emit, self.every_s, self.overwrite, self.clock = name, emit, every_s, overwrite, clock
        self._last: Optional[float] = None
        self._finished = False

    def __call__(self, done: int, total: Optional[int]) -> None:
        final = total is not None and done >= total
        now = self.clock()
        if self._finished or (not final and self._last is not None and now - self._last < self.every_s):
            return
        self._last, self._finished = now, final
        if total:
            text = f"{self.name}: {done / 1e6:.1f} / {total / 1e6:.1f} MB ({100 * done // total}%)"
        else:
            text = f"{self.name}: {done / 1e6:.1f} MB"
        self.emit(("\r" + text + ("\n" if final else "")) if self.overwrite else text)


def _copy(src: Any, out: Any, total: Optional[int], progress: Optional[Progress],
          limit: Optional[int] = None, what: str = "") -> None:
    """Copy in 64 KiB blocks, reporting progress and refusing more than ``limit`` bytes."""
    done = 0
    for block in iter(lambda: src.read(1 << 16), b""):
        done += len(block)
        if limit is not None and done > limit:
            raise ModelError(f"{what}: larger than {limit} bytes, refused")
        out.write(block)
        if progress is not None:
            progress(done, total)
    if progress is not None:
        progress(done, done)


def _download(url: str, out, size: Optional[int] = None, progress: Optional[Progress] = None) -> None:
    request = urllib.request.Request(url, headers={"User-Agent": "edge-agent"})
    try:
        with urllib.request.urlopen(request, timeout=DOWNLOAD_TIMEOUT_S) as resp:
            length = resp.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else size
            _copy(resp, out, total, progress, MAX_DOWNLOAD_BYTES, url)
    except urllib.error.HTTPError as exc:
        raise ModelError(f"cannot download {url}: HTTP {exc.code} {exc.reason}") from exc
    except OSError as exc:  # URLError, timeouts, connection errors
        raise ModelError(f"cannot download {url}: {getattr(exc, 'reason', exc)}") from exc


@dataclass
class ResolvedModel:
    path: str
    labels: Optional[List[str]]
    entry: Optional[ModelEntry]


def looks_like_path(model: str) -> bool:
    return os.path.sep in model or model.endswith(".tflite") or os.path.exists(model)


def resolve(model: str, dest: Optional[str] = None, manifest: Optional[str] = None, *,
            store: Any = None, allow_paths: bool = True, fetch_missing: bool = False,
            mirror: Optional[str] = None, progress: Optional[Progress] = None) -> ResolvedModel:
    """THE model-by-name resolver (CLI, daemon config, remote benchmark, rollback), with its labels.

    One matching rule, in this order: an entry of the device's model ``store`` (name, any case;
    sha256 or a prefix of >= 8 hex digits; the newest wins), a path (only with ``allow_paths``:
    never for names that came over the network), a manifest name (fetched into ``dest`` first
    with ``fetch_missing``, from ``mirror`` if given, with ``progress``; else it must be fetched
    already: we don't fetch silently). Labels
    come with it: the store's or the manifest's, or for a path the manifest entry with the
    same sha256: looked up here, once.
    """
    if store is not None:
        hit = store.find(model)
        if hit is not None:
            return ResolvedModel(str(hit.path), hit.labels, None)
    if allow_paths and looks_like_path(model):
        entry = entry_for_file(model)
        return ResolvedModel(model, (entry.labels or None) if entry else None, entry)
    loaded = load_manifest(manifest)
    if store is not None and model not in loaded.models:
        raise ModelError(f"unknown model '{model}': not in the device's model store nor in its manifest")
    entry = loaded.get(model)
    path = models_dir(dest) / entry.file
    if not path.is_file():
        if fetch_missing:
            path = fetch(entry, dest=dest, mirror=mirror, progress=progress or ProgressLog(entry.name, log.info))
        else:
            raise ModelError(
                f"model '{model}' is not fetched yet: run `edge-agent models fetch {model}` "
                f"(looked for {path})"
            )
    return ResolvedModel(str(path), entry.labels or None, entry)


def entry_for_file(path: str, manifest: Optional[Manifest] = None) -> Optional[ModelEntry]:
    """The manifest entry whose sha256 matches ``path`` (to find labels of a model given by path)."""
    try:
        manifest = manifest or load_manifest()
        digest = sha256_file(path)
    except (EdgeAgentError, OSError):
        return None
    for entry in manifest.models.values():
        if entry.sha256 == digest:
            return entry
    return None
