"""Frame sources: one interface (``FrameSource``), one module per backend, a registry.

Typical use (the capture thread)::

    src = open_source(config.source)          # opened, wrapped in ReopeningSource
    try:
        while running:
            frame = src.read(timeout=0.5)      # Frame | None; EndOfStream when a file ends
            ...
    finally:
        src.close()

Adding a backend is one file: ``edge_agent/sources/<kind>.py`` defining a ``BaseSource`` subclass
with ``kind`` and ``live`` and ``BACKEND = ThatClass`` (found automatically), or the same file in
an installed package that names it in the ``edge_agent.sources`` entry-point group (docs/plugins.md).
"""

from __future__ import annotations

from typing import Any

from edge_agent.sources.base import (
    BaseSource,
    Captured,
    EndOfStream,
    Frame,
    FrameSource,
    SourceSettings,
    available_kinds,
    backend_for,
    is_live,
    register,
)
from edge_agent.sources.reopen import ReopeningSource, SourceStats

__all__ = [
    "BaseSource",
    "Captured",
    "EndOfStream",
    "Frame",
    "FrameSource",
    "ReopeningSource",
    "SourceSettings",
    "SourceStats",
    "available_kinds",
    "backend_for",
    "build_source",
    "is_live",
    "open_source",
    "register",
]


def setting_choices() -> tuple:
    """What ``source.kind`` accepts (``edge_agent.registry_choices``)."""
    return available_kinds()


def build_source(settings: Any) -> BaseSource:
    """The bare backend for ``settings`` (not opened, no reopen logic)."""
    s = SourceSettings.from_any(settings)
    return backend_for(s.kind)(s)


def open_source(settings: Any, reopen: bool = True, strict: bool = True) -> FrameSource:
    """Build the backend named by ``settings.kind``, wrap it for reopen-with-backoff, open it.

    ``settings``: a Mapping or an object with attributes kind, uri, loop, width, height, fps,
    stall_timeout_s, reopen_backoff_max_s (optional: reopen_backoff_initial_s, lores_size,
    model_input). Raises ``SourceError`` for settings that can never work (unknown kind, bad
    values) and, when ``strict`` (default), if the first open fails (missing file, picamera2
    not installed, no camera); with ``strict=False`` that failure is logged and retried with
    backoff inside ``read`` like any later one. ``reopen=False`` returns the bare backend.
    """
    s = SourceSettings.from_any(settings)
    backend = backend_for(s.kind)
    if not reopen:
        src = backend(s)
        src.open()
        return src
    probe = backend(s)  # validates settings now, and gives the wrapper its name
    wrapper = ReopeningSource(
        factory=lambda: backend(s),
        name=probe.name,
        live=probe.live,
        stall_timeout_s=s.stall_timeout_s,
        backoff_initial_s=s.reopen_backoff_initial_s,
        backoff_max_s=s.reopen_backoff_max_s,
    )
    wrapper.open(strict=strict)
    return wrapper
