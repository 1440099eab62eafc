"""Pluggable TFLite runtimes: a registry of small backends.

Each backend module in this package defines ``BACKEND``, a :class:`RuntimeBackend`; modules are
discovered automatically, so adding a runtime touches exactly one new file. Installed packages add
runtimes through the ``edge_agent.runtimes`` entry-point group (docs/plugins.md). The registry's
names are ``model.runtime``'s allowed values and the CLI's ``--runtime`` choices. ``auto`` picks the
installed backend with the lowest ``priority`` (the fastest here: LiteRT's XNNPACK build runs the
Coral DeepLab 10–20x faster than tflite-runtime 2.14 on x86), overridable with ``EDGE_AGENT_RUNTIME``.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import sys
import tempfile
import threading
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterator, List, Optional

from edge_agent import discover_backends
from edge_agent.errors import ModelError, RuntimeNotAvailable
from edge_agent.inference.runtimes import edgetpu

log = logging.getLogger(__name__)

ENV_RUNTIME = "EDGE_AGENT_RUNTIME"
ENTRY_POINT_GROUP = "edge_agent.runtimes"  # third-party runtimes (docs/plugins.md)


@dataclass(frozen=True)
class RuntimeBackend:
    """How to get an ``Interpreter`` class and ``load_delegate`` from one installed package."""

    name: str
    priority: int
    module: str  # importable module that proves the runtime is installed
    interpreter: Callable[[], Any]  # returns the Interpreter class (imports lazily)
    load_delegate: Callable[[], Any]  # returns the load_delegate function
    version: Callable[[], str]
    aliases: tuple = ()

    def is_available(self) -> bool:
        try:
            self.interpreter()
            return True
        except Exception:  # ImportError, or a broken install (e.g. numpy ABI mismatch)
            return False


@dataclass
class LoadedInterpreter:
    """An allocated interpreter and what actually runs it (reported in info/benchmarks)."""

    interpreter: Any
    runtime: str
    runtime_version: str
    delegate: Optional[str]  # e.g. "edgetpu:usb:0", None on CPU
    threads: int
    model_path: str

    def describe(self) -> str:
        where = self.delegate or "cpu"
        return f"{self.runtime} {self.runtime_version} ({where}, {self.threads} threads)"


def package_backend(name: str, priority: int, package: str, aliases: tuple = ()) -> RuntimeBackend:
    """A backend for a package laid out like tflite-runtime: ``<package>.interpreter`` has
    ``Interpreter`` and ``load_delegate``, ``<package>.__version__`` the version. Imports lazily."""

    def interpreter_module():
        return importlib.import_module(f"{package}.interpreter")

    return RuntimeBackend(
        name=name,
        priority=priority,
        module=package,
        interpreter=lambda: interpreter_module().Interpreter,
        load_delegate=lambda: interpreter_module().load_delegate,
        version=lambda: getattr(importlib.import_module(package), "__version__", "unknown"),
        aliases=aliases,
    )


_REGISTRY: Dict[str, RuntimeBackend] = {}
_FAILED: Dict[str, str] = {}  # plugin -> why it was not loaded
_LOCK = threading.Lock()
_discovered = False


def register(backend: RuntimeBackend) -> RuntimeBackend:
    """Add a backend; refuses anything else and a name or alias that is already taken."""
    if not isinstance(backend, RuntimeBackend):
        raise TypeError(f"{backend!r} is not a RuntimeBackend (a runtime module defines BACKEND = RuntimeBackend(...))")
    taken = {n for b in _REGISTRY.values() for n in (b.name, *b.aliases)}
    clash = sorted({backend.name, *backend.aliases} & (taken | {"auto"}))
    if clash:
        raise ValueError(f"runtime {backend.name!r}: name or alias {clash[0]!r} is already taken")
    _REGISTRY[backend.name] = backend
    return backend


def _discover() -> None:
    global _discovered
    with _LOCK:
        if not _discovered:
            _FAILED.update(discover_backends(__name__, ENTRY_POINT_GROUP, register))
            _discovered = True


def backends() -> List[RuntimeBackend]:
    """All known backends, fastest first (installed or not)."""
    _discover()
    return sorted(_REGISTRY.values(), key=lambda b: b.priority)


def available() -> List[str]:
    """Names of the installed backends, fastest first."""
    return [b.name for b in backends() if b.is_available()]


def names() -> List[str]:
    return [b.name for b in backends()]


def choices() -> List[str]:
    """What ``model.runtime`` and ``--runtime`` accept: ``auto`` and every registered backend."""
    return ["auto", *names()]


setting_choices = choices  # for ``edge_agent.registry_choices("model.runtime")``


def resolve(name: Optional[str] = "auto") -> RuntimeBackend:
    """Return the backend for ``name`` (``auto``/None: $EDGE_AGENT_RUNTIME, else the fastest)."""
    _discover()
    if not name or name == "auto":
        name = os.environ.get(ENV_RUNTIME) or "auto"
    if name == "auto":
        for backend in backends():
            if backend.is_available():
                return backend
        raise RuntimeNotAvailable(
            "no TFLite runtime is installed: pip install ai-edge-litert "
            "(or tflite-runtime with numpy<2, or tensorflow)"
        )
    for backend in _REGISTRY.values():
        if name == backend.name or name in backend.aliases:
            if not backend.is_available():
                raise RuntimeNotAvailable(
                    f"runtime '{backend.name}' is not installed (python module '{backend.module}' "
                    f"cannot be imported); installed: {', '.join(available()) or 'none'}"
                )
            return backend
    broken = f" (plugin '{name}' failed to load: {_FAILED[name]})" if name in _FAILED else ""
    raise RuntimeNotAvailable(f"unknown runtime '{name}': choose auto, {', '.join(names())}{broken}")


def default_threads() -> int:
    return max(1, os.cpu_count() or 1)


def create_interpreter(
    model_path: str,
    runtime: Optional[str] = "auto",
    threads: Optional[int] = None,
    edgetpu_device: Optional[str] = None,
    allocate: bool = True,
) -> LoadedInterpreter:
    """Create (and allocate) an interpreter for ``model_path``.

    ``edgetpu_device`` None = CPU only; "" = any Edge TPU; else ``usb``, ``usb:N``, ``pci``,
    ``pci:N`` or ``:N``. Errors are :class:`ModelError` / :class:`RuntimeNotAvailable` with one
    readable line; the caller decides about CPU fallback.
    """
    backend = resolve(runtime)
    threads = int(threads) if threads and int(threads) > 0 else default_threads()
    delegates = []
    delegate_name = None
    if edgetpu_device is not None:
        delegates.append(edgetpu.load(backend.load_delegate(), edgetpu_device))
        delegate_name = "edgetpu" + (f":{edgetpu_device}" if edgetpu_device else "")
    Interpreter = backend.interpreter()
    try:
        kwargs: Dict[str, Any] = {"model_path": model_path, "num_threads": threads}
        if delegates:
            kwargs["experimental_delegates"] = delegates
        with native_stderr_filtered():
            interpreter = Interpreter(**kwargs)
    except (ValueError, RuntimeError) as exc:
        raise ModelError(f"{model_path}: not a loadable TFLite model ({_first_line(exc)})") from exc
    if allocate:
        try:
            with native_stderr_filtered():
                interpreter.allocate_tensors()
        except (ValueError, RuntimeError) as exc:
            raise ModelError(
                f"{model_path}: the runtime cannot prepare this model ({_first_line(exc)})"
            ) from exc
    return LoadedInterpreter(
        interpreter=interpreter,
        runtime=backend.name,
        runtime_version=backend.version(),
        delegate=delegate_name,
        threads=threads,
        model_path=model_path,
    )


@contextlib.contextmanager
def native_stderr_filtered() -> Iterator[None]:
    """Hold back the runtime's native ``INFO:`` chatter (e.g. LiteRT's "Created TensorFlow Lite
    XNNPACK delegate for CPU.", written by C++ straight to fd 2 while the interpreter is created).

    Anything else the native code writes (warnings, errors) is passed on to stderr unchanged; the
    INFO lines go to the DEBUG log, so ``-vv`` shows them. fd 2 is redirected for the duration only.
    """
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):  # no usable fd 2 (embedded interpreters): nothing to filter
        yield
        return
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            for line in captured.read().decode("utf-8", "replace").splitlines(keepends=True):
                if line.startswith("INFO: "):
                    log.debug("runtime: %s", line.rstrip())
                else:
                    sys.stderr.write(line)
            sys.stderr.flush()


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]
