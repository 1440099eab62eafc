"""edge-agent: an edge-device deployment agent for semantic segmentation (DeepLab on TFLite)."""

import importlib
import logging
import pkgutil
import types
from typing import Any, Callable, Dict, List

__version__ = "0.1.0"


def discover_backends(package: str, group: str, register: Callable[[Any], Any]) -> Dict[str, str]:
    """Register every backend of a registry (runtimes, sources); returns {plugin: why not loaded}.

    Built-in backends are the ``BACKEND`` of each module of ``package`` (one file each; a failing
    import means a broken install and raises). Plugins are the entry points of ``group`` in
    installed distributions, each naming a module that defines ``BACKEND`` or the backend itself:
    one that cannot be loaded or that ``register`` refuses is skipped with a warning, so a broken
    plugin never stops an agent that does not use it.
    """
    for info in pkgutil.iter_modules(importlib.import_module(package).__path__):
        backend = getattr(importlib.import_module(f"{package}.{info.name}"), "BACKEND", None)
        if backend is not None:
            register(backend)
    failed: Dict[str, str] = {}
    for ep in _entry_points(group):
        try:
            obj = ep.load()
            register(getattr(obj, "BACKEND", obj) if isinstance(obj, types.ModuleType) else obj)
        except Exception as exc:  # a plugin's bug must not take the agent down
            failed[ep.name] = f"{type(exc).__name__}: {exc}".splitlines()[0]
            logging.getLogger(__name__).warning("plugin %s = %s (%s) not loaded: %s",
                                                ep.name, ep.value, group, failed[ep.name])
    return failed


# Settings whose values are the names of a registry (built-in backends and plugins), and the
# registry's package. The config asks through here, by name, so it never imports the layers above it.
REGISTRIES = {"source.kind": "edge_agent.sources", "model.runtime": "edge_agent.inference.runtimes"}


def registry_choices(setting: str) -> List[str]:
    """What ``setting`` accepts: the ``setting_choices()`` of its registry's package."""
    return list(importlib.import_module(REGISTRIES[setting]).setting_choices())


def _entry_points(group: str) -> List[Any]:
    from importlib import metadata  # late: only registries need it

    eps = metadata.entry_points()
    if hasattr(eps, "select"):  # Python >= 3.10
        return list(eps.select(group=group))
    return list(eps.get(group, ()))  # type: ignore[attr-defined]
