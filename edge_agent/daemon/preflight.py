"""What ``run`` would refuse at start, found without a camera or a broker: ``config check``.

``load_config`` checks each key and the keys that depend on each other. This goes one step
further, to what only the running agent used to find: the model (resolved by path, name or the
store's current entry, then loaded with the configured runtime, labels and normalisation, as
``run`` loads it), the source's files, ``deploy.public_key`` and the MQTT TLS material. Every
problem is one line naming the setting that resolves it; all of them are reported at once.

``run`` itself does not refuse to start on these (it serves MQTT and commands, and a deployment
can bring the missing model); it reports the same reasons in ``info.error`` and its log.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Collection, List, Optional

from edge_agent.config import Config
from edge_agent.errors import EdgeAgentError
from edge_agent.inference.segmenter import ModelSettings, Segmenter
from edge_agent.models import catalog, signing
from edge_agent.models.store import MODELS_SUBDIR, ModelStore
from edge_agent.sources import build_source


def problems(cfg: Config, load_model: bool = True, skip: Collection[str] = ()) -> List[str]:
    """Every start-up refusal of ``cfg``, one line each (empty: ``run`` starts its pipeline).

    ``load_model``: build the model's interpreter as ``run`` does (about a second); False
    checks only that the model file can be found. ``skip``: sections not to check (their
    keys already failed)."""
    out: List[str] = []
    out += _source_problems(cfg, skip)
    if "model" not in skip:
        out += _model_problems(cfg, load_model)
    if "deploy" not in skip:
        out += _deploy_problems(cfg)
    if "mqtt" not in skip:
        out += _tls_problems(cfg)
    return out


def _keyed(prefix: str, message: str) -> str:
    """``message`` as one line naming its setting (``prefix`` when it names none)."""
    line = " ".join(message.split())
    return line if (prefix if "." in prefix else prefix + ".") in line else f"{prefix}: {line}"


def _source_problems(cfg: Config, skip: Collection[str] = ()) -> List[str]:
    """Each camera's (``[source]``'s, or ``cameras[i]``'s, named so)."""
    out: List[str] = []
    for i, camera in enumerate(cfg.camera_list()):
        key = f"cameras[{i}]" if cfg.cameras else "source"
        if key in skip or (cfg.cameras and "cameras" in skip):
            continue
        try:
            source = build_source(dataclasses.asdict(camera))  # refuses settings that never work
            found = source.preflight()
        except EdgeAgentError as exc:
            found = [str(exc)]
        out += [_keyed(key, p if key == "source" else p.replace("source.", key + ".")) for p in found]
    return out


def _stored_current(cfg: Config) -> Optional[str]:
    """The store's current model (what ``run`` starts with), read without repairing the store."""
    store = ModelStore(Path(cfg.agent.state_dir) / MODELS_SUBDIR, cfg.deploy.keep_models)
    try:
        sha = store.current()
        return str(store.get(sha).path) if sha and store.has(sha) else None
    except (EdgeAgentError, OSError):
        return None


def _model_problems(cfg: Config, load_model: bool) -> List[str]:
    m = cfg.model
    stored = _stored_current(cfg)
    if not (m.path or m.name):
        if stored is not None:
            return []
        return ["model.path: no model configured: set model.path or model.name "
                "(`edge-agent models list` names the known ones)"]
    try:
        if m.path:
            if not Path(m.path).expanduser().is_file():
                return [f"model.path: file not found: {m.path}"]
            resolved = catalog.resolve(os.path.expanduser(m.path))
        else:
            entry = catalog.load_manifest().get(m.name)  # ModelError for an unknown name
            dest = os.environ.get(catalog.ENV_MODELS_DIR) or os.path.join(cfg.agent.state_dir, "catalog")
            path = catalog.models_dir(dest) / entry.file
            if not path.is_file():
                if m.mirror and not (Path(m.mirror).expanduser() / entry.file).is_file():
                    return [f"model.mirror: {m.mirror} has no {entry.file} for model.name {m.name!r}"]
                return []  # ``run`` fetches it (sha256-verified) on its first start
            resolved = catalog.ResolvedModel(str(path), entry.labels or None, entry)
    except EdgeAgentError as exc:
        return [_keyed("model.name" if not m.path else "model.path", str(exc))]
    if m.labels and not Path(m.labels).expanduser().is_file():
        return [f"model.labels: file not found: {m.labels}"]
    if not load_model:
        return []
    try:
        Segmenter.from_settings(resolved.path, m.labels or resolved.labels, ModelSettings.from_config(m))
    except EdgeAgentError as exc:
        return [_keyed("model", str(exc))]
    return []


def _deploy_problems(cfg: Config) -> List[str]:
    if not cfg.deploy.public_key:
        return []
    try:
        signing.load_public_key(cfg.deploy.public_key)
    except EdgeAgentError as exc:
        return [_keyed("deploy.public_key", str(exc))]
    return []


def _tls_problems(cfg: Config) -> List[str]:
    if not (cfg.mqtt.enabled and cfg.mqtt.tls):
        return []
    from edge_agent.comms.tls import tls_context  # late: paho is only needed with TLS on

    try:
        tls_context(cfg.mqtt)  # loads the CA and the cert/key pair as ``run`` will
    except EdgeAgentError as exc:
        return [_keyed("mqtt", str(exc))]
    return []
