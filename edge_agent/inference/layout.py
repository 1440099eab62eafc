"""How many interpreters, with how many threads each: chosen from the cores and the sources when
``model.interpreters`` / ``model.threads`` are 0 (automatic, the default).

Two layouts (docs/performance.md, "Fast by default"):

- **per core** (N interpreters x 1 thread): frames inferred side by side; every core busy and the
  agent's other per-frame work (JPEG decode, PNG, MQTT) shared by the cores instead of stalling a
  lockstep ``invoke()``. The most frames per second, at the price of one core's ``invoke()`` as
  latency and N models in memory. Right when frames arrive faster than one interpreter serves
  them: files, folders and video at full speed, any unpaced source, several cameras.
- **all cores** (1 interpreter x N threads): the lowest latency per frame. Right when latency is
  what counts: one paced camera that one interpreter keeps up with, an Edge TPU (one TPU runs one
  interpreter), one CPU.

:func:`choose_layout` is a pure function of its arguments; :func:`for_config` feeds it from a
config and :func:`apply` writes the result into ``config.model``.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass
from typing import Any, Dict, Optional, Sequence, Tuple

log = logging.getLogger(__name__)

MAX_INTERPRETERS = 16  # the schema's bound of model.interpreters
MB_PER_INTERPRETER = 512  # automatic: at most one interpreter per 512 MB of RAM (a model: 35-45 MB + frames)


@dataclass(frozen=True)
class SourceLoad:
    """What the layout needs to know of a camera: its kind, ``fps`` (0 = as fast as it delivers)
    and whether it is live (a camera or stream) or read at will (files, folders, video files)."""

    kind: str
    fps: float = 0.0
    live: bool = False


@dataclass(frozen=True)
class Layout:
    interpreters: int
    threads: int
    reason: str
    auto: bool = True  # chosen here (False: both values set in the config)

    def to_dict(self) -> Dict[str, Any]:
        return {"interpreters": self.interpreters, "threads": self.threads, "auto": self.auto,
                "reason": self.reason}

    def describe(self) -> str:
        return (f"{self.interpreters} interpreter{'s' if self.interpreters != 1 else ''} x "
                f"{self.threads} thread{'s' if self.threads != 1 else ''} "
                f"({'automatic' if self.auto else 'configured'}: {self.reason})")


def _why_per_core(sources: Sequence[SourceLoad], serve_fps: Optional[float]) -> Optional[str]:
    """Why frames arrive faster than one interpreter serves them, or None when they do not."""
    if len(sources) > 1:
        return f"{len(sources)} cameras share the interpreters"
    for s in sources:
        if s.fps <= 0:
            what = f"{s.kind} source" + ("" if s.live else " read at full speed")
            return f"{what} (fps = 0): frames come as fast as they are served"
    total = sum(s.fps for s in sources)
    if serve_fps is not None and total > serve_fps:
        return f"{total:g} fps asked, one interpreter serves {serve_fps:.1f}"
    return None


def choose_layout(cpus: int, sources: Sequence[SourceLoad], edgetpu: bool = False,
                  interpreters: int = 0, threads: int = 0, serve_fps: Optional[float] = None,
                  mem_mb: Optional[int] = None) -> Layout:
    """The layout for ``cpus`` cores and these sources. ``interpreters``/``threads`` > 0 are the
    config's own values and are kept (0 = choose). ``serve_fps``: frames per second one interpreter
    on all cores serves, when known (a paced camera above it gets the per-core layout too).
    ``mem_mb``: the machine's RAM; the automatic choice keeps one interpreter per 512 MB."""
    cpus = max(1, int(cpus))
    if interpreters and threads:
        return Layout(interpreters, threads, "model.interpreters and model.threads set", auto=False)
    if interpreters:
        return Layout(interpreters, max(1, cpus // interpreters),
                      f"model.interpreters = {interpreters} set: the {cpus} cores shared between them")
    if edgetpu:
        return Layout(1, threads or cpus, "Edge TPU: one TPU runs one interpreter")
    per_thread = threads or 1
    most = min(MAX_INTERPRETERS, cpus // per_thread)
    why = _why_per_core(sources, serve_fps)
    if why is None:
        paced = ", ".join(f"{s.kind} at {s.fps:g} fps" for s in sources) or "no source"
        return Layout(1, threads or cpus, f"latency: one paced camera ({paced}), one interpreter on all cores")
    if most < 2:
        return Layout(1, threads or cpus, f"{why}, but {cpus} core{'s' if cpus != 1 else ''} "
                      f"for {per_thread}-thread interpreters: one interpreter")
    if mem_mb is not None and mem_mb // MB_PER_INTERPRETER < most:
        capped = max(1, mem_mb // MB_PER_INTERPRETER)
        if capped < 2:
            return Layout(1, threads or cpus, f"{why}, but {mem_mb} MB of RAM: one interpreter")
        return Layout(capped, per_thread if threads else max(1, cpus // capped),
                      f"{why}: interpreters side by side, {capped} for {mem_mb} MB of RAM")
    return Layout(most, per_thread, f"{why}: one interpreter per core, frames side by side")


def cpu_count() -> int:
    """The cores this process may run on (affinity, e.g. ``taskset`` or a cgroup cpuset)."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def memory_mb() -> Optional[int]:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) // 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def source_loads(config: Any) -> Tuple[SourceLoad, ...]:
    """The config's cameras (``[[cameras]]``, else ``[source]``) as :class:`SourceLoad`."""
    from edge_agent.sources import is_live

    cameras = config.camera_list() if hasattr(config, "camera_list") else (config.source,)
    loads = []
    for cam in cameras:
        try:
            live = is_live(cam)
        except Exception:  # an unknown kind: the source itself reports it
            live = True
        loads.append(SourceLoad(cam.kind, float(cam.fps), live))
    return tuple(loads)


def for_config(config: Any, cpus: Optional[int] = None, mem_mb: Optional[int] = None) -> Layout:
    m = config.model
    return choose_layout(cpu_count() if cpus is None else cpus, source_loads(config), bool(m.edgetpu),
                         m.interpreters, m.threads, mem_mb=memory_mb() if mem_mb is None else mem_mb)


def apply(config: Any, layout: Optional[Layout] = None) -> Tuple[Any, Layout]:
    """``config`` with ``model.interpreters``/``model.threads`` set to the layout (chosen by
    :func:`for_config` when not given), and the layout; logged once per call."""
    layout = layout or for_config(config)
    model = dataclasses.replace(config.model, interpreters=layout.interpreters, threads=layout.threads)
    log.info("inference layout: %s", layout.describe())
    return dataclasses.replace(config, model=model), layout
