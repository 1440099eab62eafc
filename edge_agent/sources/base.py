"""The one interface every frame source implements, its settings, and the backend registry.

Why a registry: the daemon names its source in the config (``source.kind = "picamera2"``), the
config accepts exactly the registered kinds, and backends import optional packages (picamera2
exists only on a Raspberry Pi) only when opened. A backend is ONE file: a module of
``edge_agent/sources`` that defines ``BACKEND = <BaseSource subclass>``, found automatically, or an
installed plugin in the ``edge_agent.sources`` entry-point group (docs/plugins.md).

Every backend class declares ``kind`` and ``live`` (True: a camera or stream that runs in real time,
so the pipeline drops frames to keep up; False: files, folders, generators, every frame is
processed). A class without ``live`` is refused at registration: a live camera must never run in
lossless mode because it forgot to say so.
"""

from __future__ import annotations

import dataclasses
import re
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Dict, List, Mapping, NamedTuple, Optional, Tuple, Type, Union

import numpy as np

try:  # Python >= 3.8
    from typing import Protocol, runtime_checkable
except ImportError:  # pragma: no cover
    from typing_extensions import Protocol, runtime_checkable  # type: ignore

from edge_agent import discover_backends
from edge_agent.config import SourceConfig, mask_url_secrets
from edge_agent.errors import SourceError


class EndOfStream(Exception):
    """A finite source (a file or a folder with ``loop = false``) has delivered its last frame.

    Not an error and not a ``SourceError``: the reopen wrapper passes it through untouched so the
    pipeline can shut down cleanly instead of reopening the file forever.
    """


@dataclass(frozen=True)
class Frame:
    """One captured frame.

    ``image`` is HxWx3 uint8 RGB, C-contiguous (what ``letterbox`` expects). ``seq`` is
    monotonic over the life of the source, across reopens. ``timestamp`` is the wall-clock
    capture time (``time.time()``, for consumers on other hosts), ``monotonic`` the same
    instant on ``time.monotonic()`` (for latencies inside the agent). ``size`` (h, w) is the
    frame's size at the source when ``image`` was decoded smaller than that (libjpeg DCT scaling,
    asked for by a :data:`DecodeHint`); ``height``/``width``, the geometry and the masks are
    always the source's size.
    """

    image: np.ndarray
    seq: int
    timestamp: float
    monotonic: float
    source: str
    size: Optional[Tuple[int, int]] = None

    @property
    def height(self) -> int:
        return int(self.size[0]) if self.size else int(self.image.shape[0])

    @property
    def width(self) -> int:
        return int(self.size[1]) if self.size else int(self.image.shape[1])

    @property
    def reduced(self) -> bool:
        """``image`` is smaller than the frame (a reduced-size decode)."""
        return self.size is not None and tuple(self.size) != self.image.shape[:2]


# What the consumer of a source will resample a frame of (h, w) to: (min_h, min_w). A backend that
# can decode at reduced size (JPEG/MJPEG: 1/2, 1/4, 1/8) may do so while the decoded image stays at
# least that large; the pipeline sets it from the model's input and preprocess mode.
DecodeHint = Callable[[int, int], Tuple[int, int]]


@runtime_checkable
class FrameSource(Protocol):
    """What the pipeline's capture thread talks to.

    ``read(timeout)`` blocks at most about ``timeout`` seconds and returns ``None`` when no frame
    arrived in that time; it raises ``EndOfStream`` when a finite source is done. Backends raise
    ``SourceError`` (or anything else) on failure; the reopen wrapper turns that into a reopen.
    """

    name: str

    def open(self) -> None: ...

    def read(self, timeout: float = 1.0) -> Optional[Frame]: ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class SourceSettings:
    """The source part of the config, normalised from a Mapping or an attribute object.

    ``width``/``height`` are the requested capture size (cameras, synthetic; the schema's
    640x480 unless given; 0 = the backend's own size). ``fps`` paces files, folders and the synthetic pattern and requests a camera
    frame rate (0 = as fast as possible). ``lores_size`` (w, h) and ``model_input`` (h, w) are
    only used by picamera2 to size the ISP-scaled stream, ``format`` by picamera2 for the format it
    asks that stream in ("" = its default).
    """

    # Defaults are the config schema's ([source] in edge_agent/config.py), never re-declared here.
    kind: str = SourceConfig.kind
    uri: str = SourceConfig.uri
    loop: bool = SourceConfig.loop
    width: int = SourceConfig.width
    height: int = SourceConfig.height
    fps: float = SourceConfig.fps
    stall_timeout_s: float = SourceConfig.stall_timeout_s
    reopen_backoff_max_s: float = SourceConfig.reopen_backoff_max_s
    reopen_backoff_initial_s: float = 0.5
    lores_size: Optional[Tuple[int, int]] = None
    model_input: Optional[Tuple[int, int]] = None
    format: str = SourceConfig.format

    @classmethod
    def from_any(cls, settings: Any) -> "SourceSettings":
        """Accept a SourceSettings, a Mapping, or any object with matching attributes."""
        if isinstance(settings, SourceSettings):
            return settings
        values: Dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            if isinstance(settings, Mapping):
                if f.name in settings:
                    values[f.name] = settings[f.name]
            elif hasattr(settings, f.name):
                values[f.name] = getattr(settings, f.name)
        try:
            return cls(**values)._validated()
        except (TypeError, ValueError) as exc:
            raise SourceError(f"invalid source settings: {exc}") from None

    def _validated(self) -> "SourceSettings":
        kind = str(self.kind).strip().lower()
        for name in ("width", "height"):
            if int(getattr(self, name)) < 0:
                raise ValueError(f"source.{name} must be >= 0, got {getattr(self, name)!r}")
        for name in ("fps", "stall_timeout_s", "reopen_backoff_max_s", "reopen_backoff_initial_s"):
            if float(getattr(self, name)) < 0:
                raise ValueError(f"source.{name} must be >= 0, got {getattr(self, name)!r}")
        return dataclasses.replace(
            self,
            kind=kind,
            uri="" if self.uri is None else str(self.uri),
            format="" if self.format is None else str(self.format).strip(),
            loop=bool(self.loop),
            width=int(self.width),
            height=int(self.height),
            fps=float(self.fps),
            stall_timeout_s=float(self.stall_timeout_s),
            reopen_backoff_max_s=float(self.reopen_backoff_max_s),
            reopen_backoff_initial_s=float(self.reopen_backoff_initial_s),
            lores_size=_pair(self.lores_size, "lores_size"),
            model_input=_pair(self.model_input, "model_input"),
        )


def _pair(value: Any, name: str) -> Optional[Tuple[int, int]]:
    if value is None or value == "" or value == ():
        return None
    a, b = (int(v) for v in value)
    if a <= 0 or b <= 0:
        raise ValueError(f"source.{name} must be two positive integers, got {value!r}")
    return (a, b)


ENTRY_POINT_GROUP = "edge_agent.sources"
_KIND = re.compile(r"[a-z0-9][a-z0-9_-]*")  # SourceSettings lower-cases the configured kind
_REGISTRY: Dict[str, Type["BaseSource"]] = {}
_FAILED: Dict[str, str] = {}  # plugin -> why it was not loaded
_LOCK = threading.RLock()
_discovered = False


def register(cls: Type["BaseSource"]) -> Type["BaseSource"]:
    """Make ``cls`` openable as ``source.kind = cls.kind``; refuses a class that does not declare
    ``kind`` and ``live``, or whose kind is taken. Usable as a class decorator."""
    where = f"{getattr(cls, '__module__', '?')}.{getattr(cls, '__qualname__', repr(cls))}"
    if not (isinstance(cls, type) and issubclass(cls, BaseSource)):
        raise TypeError(f"source backend {where}: not a BaseSource subclass")
    kind = getattr(cls, "kind", None)
    if not isinstance(kind, str) or not _KIND.fullmatch(kind):
        raise TypeError(f"source backend {where}: declare kind = '<name>' (lower-case letters, "
                        f"digits, '_' or '-'), got {kind!r}")
    if not isinstance(getattr(cls, "live", None), bool):
        raise TypeError(f"source backend {where}: declare live = True (camera or stream: frames "
                        f"are dropped to keep up) or live = False (files, folders: every frame "
                        f"is processed)")
    with _LOCK:
        if kind in _REGISTRY and _REGISTRY[kind] is not cls:
            raise ValueError(f"source backend {where}: kind {kind!r} is already taken by "
                             f"{_REGISTRY[kind].__module__}.{_REGISTRY[kind].__qualname__}")
        _REGISTRY[kind] = cls
    return cls


def _discover() -> None:
    global _discovered
    with _LOCK:
        if not _discovered:
            _discovered = True  # first: a plugin's import may ask the registry again
            try:
                _FAILED.update(discover_backends("edge_agent.sources", ENTRY_POINT_GROUP, register))
            except BaseException:
                _discovered = False
                raise


def available_kinds() -> Tuple[str, ...]:
    """Every registered kind (built-in and plugins), sorted."""
    _discover()
    return tuple(sorted(_REGISTRY))


def backend_for(kind: str) -> Type["BaseSource"]:
    _discover()
    try:
        return _REGISTRY[kind]
    except KeyError:
        known = ", ".join(available_kinds()) or "none"
        broken = f"; plugin {kind!r} failed to load: {_FAILED[kind]}" if kind in _FAILED else ""
        raise SourceError(f"unknown source kind {kind!r} (known: {known}{broken})") from None


def is_live(settings: Any) -> bool:
    """Whether the source ``settings`` name runs in real time, asked of its class (nothing opened)."""
    s = SourceSettings.from_any(settings)
    return backend_for(s.kind).live_for(s)


class BaseSource:
    """Shared plumbing for backends: settings, a per-open sequence counter, frame stamping.

    Backends implement ``open``/``_read``/``close``; ``read`` wraps ``_read`` so every frame
    is stamped the same way. ``skipped`` counts inputs dropped for cause (unreadable files).
    Subclasses declare ``kind`` and ``live`` (see the module docstring); an instance's ``live``
    is ``live_for(settings)``.
    """

    kind: ClassVar[str]
    live: bool  # declared per class; per instance: live_for(settings)

    @classmethod
    def live_for(cls, settings: SourceSettings) -> bool:
        """Live with these settings? The class's ``live``; override when the uri decides."""
        return cls.live

    def __init__(self, settings: SourceSettings) -> None:
        self.settings = settings
        self.live = self.live_for(settings)
        # the name goes into logs, frames and stats: a stream URL's password never does
        self.name = f"{self.kind}:{mask_url_secrets(settings.uri)}" if settings.uri else self.kind
        self.skipped = 0
        self._seq = 0
        self.decode_hint: Optional[DecodeHint] = None

    def set_decode_hint(self, hint: Optional[DecodeHint]) -> None:
        """Allow reduced-size decoding down to ``hint(h, w)`` (None: full size). Backends that
        cannot decode reduced ignore it."""
        self.decode_hint = hint

    def preflight(self) -> List[str]:
        """Problems that make ``open`` fail for sure, found without opening a device (a missing
        folder or file): ``config check`` reports them. Default: none known in advance."""
        return []

    def open(self) -> None:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def _read(self, timeout: float) -> Union[None, np.ndarray, "Captured"]:
        """Return an RGB image (stamped now) or a ``Captured`` (stamped at grab time),
        None for no frame yet; raise EndOfStream or SourceError."""
        raise NotImplementedError

    def read(self, timeout: float = 1.0) -> Optional[Frame]:
        got = self._read(timeout)
        if got is None:
            return None
        if isinstance(got, Captured):
            return self._frame(got.image, got.timestamp, got.monotonic, got.size)
        return self._frame(got, time.time(), time.monotonic())

    def _frame(self, image: np.ndarray, wall: float, mono: float,
               size: Optional[Tuple[int, int]] = None) -> Frame:
        self._seq += 1
        return Frame(
            image=ensure_rgb_uint8(image),
            seq=self._seq,
            timestamp=wall,
            monotonic=mono,
            source=self.name,
            size=None if size is None or tuple(size) == image.shape[:2] else (int(size[0]), int(size[1])),
        )

    def __enter__(self) -> "BaseSource":
        self.open()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Captured(NamedTuple):
    """An image with the instant it was grabbed (live sources grab on their own thread), and the
    frame's size at the source when the image was decoded smaller (``Frame.size``)."""

    image: np.ndarray
    timestamp: float
    monotonic: float
    size: Optional[Tuple[int, int]] = None


def ensure_rgb_uint8(image: np.ndarray) -> np.ndarray:
    """The Frame contract: HxWx3 uint8, C-contiguous. Fails loudly on anything else."""
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise SourceError(f"backend produced {image.dtype} {image.shape}, expected HxWx3 uint8")
    return np.ascontiguousarray(image)


class Pacer:
    """Sleeps so that successive frames are at most ``fps`` per second (0 = no pacing).

    Used by file, folder and synthetic sources so a 30 fps clip replays at 30 fps instead of as
    fast as the decoder goes. Returns False when the wait would exceed ``timeout``.
    """

    def __init__(self, fps: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.period = 1.0 / fps if fps > 0 else 0.0
        self._clock = clock
        self._due = 0.0

    def wait(self, timeout: float) -> bool:
        if self.period <= 0:
            return True
        now = self._clock()
        delay = self._due - now
        if delay > timeout:
            time.sleep(max(timeout, 0.0))
            return False
        if delay > 0:
            time.sleep(delay)
        # Do not accumulate debt after a stall: restart the schedule from now.
        self._due = max(self._due, now) + self.period
        return True
