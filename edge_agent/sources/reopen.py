"""Keep a source alive: close and reopen it with exponential backoff when it fails or stalls.

Why a wrapper and not per-backend retry loops: every backend fails the same ways from the
daemon's point of view (raises, stops delivering, disappears), and the recovery is the same.
The wrapper owns the frame sequence so ``seq`` keeps increasing across reopens (consumers pair
``result`` and ``mask`` messages by it), and it never raises out of ``read`` for a transient
failure: the capture thread just sees ``None`` while the source is down, and ``stats()`` tells
the story (one log line per failure, not per read).
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional

from edge_agent.config import SourceConfig, mask_url_secrets
from edge_agent.errors import SourceError
from edge_agent.sources.base import EndOfStream, Frame, FrameSource

log = logging.getLogger(__name__)


@dataclass
class SourceStats:
    """Counters for the ``stats`` topic. ``errors`` counts failures of reads and of reopen
    attempts, ``stalls`` the times no frame came for ``stall_timeout_s``, ``reopens`` the
    successful reopens, ``skipped`` inputs the backends dropped (unreadable files)."""

    frames: int = 0
    errors: int = 0
    stalls: int = 0
    reopens: int = 0
    skipped: int = 0
    state: str = "closed"  # closed | open | down | ended
    last_error: str = ""

    def as_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)


class ReopeningSource:
    """A ``FrameSource`` that wraps a backend factory and survives its failures.

    ``open()`` opens the backend once; strict, it raises ``SourceError`` if that fails, else (the
    agent's choice: a camera or stream may come up after it) the failure is retried like any
    later one. After that, any exception from the backend,
    or no frame for ``stall_timeout_s`` (0 disables), closes it; reopening is attempted after
    ``backoff_initial_s``, doubling up to ``backoff_max_s``; the delay resets once a frame
    arrives. ``EndOfStream`` is passed through. ``live`` is the wrapped backend's (a camera's
    frames are dropped to keep up; a file's are not), given by the caller so no backend is built.
    """

    def __init__(
        self,
        factory: Callable[[], FrameSource],
        name: str,
        *,
        live: bool,
        stall_timeout_s: float = SourceConfig.stall_timeout_s,
        backoff_initial_s: float = 0.5,
        backoff_max_s: float = SourceConfig.reopen_backoff_max_s,
    ) -> None:
        self._factory = factory
        self.name = mask_url_secrets(name)
        self.live = live
        self.stall_timeout_s = stall_timeout_s
        self.backoff_initial_s = min(backoff_initial_s, backoff_max_s)
        self.backoff_max_s = backoff_max_s
        self._inner: Optional[FrameSource] = None
        self._seq = 0
        self._delay = self.backoff_initial_s
        self._retry_at = 0.0
        self._last_frame_mono = 0.0
        self._closed = threading.Event()
        self._lock = threading.Lock()  # close() waits for an in-flight read (no release mid-read)
        self._stats = SourceStats()
        self._decode_hint: Any = None

    def set_decode_hint(self, hint: Any) -> None:
        """``BaseSource.set_decode_hint`` for the backend now and every one opened later."""
        self._decode_hint = hint
        _hint(self._inner, hint)

    # -- FrameSource -------------------------------------------------------------------------

    def open(self, strict: bool = True) -> None:
        """Open the backend. ``strict``: a failure raises (bad config, no camera at start);
        otherwise it is logged and retried by ``read`` like any later failure (a camera or
        RTSP server that comes up after the agent at boot)."""
        self._closed.clear()
        inner = self._factory()
        _hint(inner, self._decode_hint)
        try:
            inner.open()
        except Exception as exc:
            if strict:
                raise
            self._stats.state = "down"
            self._fail(f"open failed: {_one_line(exc)}")
            return
        self._inner = inner
        self._last_frame_mono = time.monotonic()
        self._stats.state = "open"

    def read(self, timeout: float = 1.0) -> Optional[Frame]:
        """The next frame, None if none within ~``timeout`` (or while the backend is down)."""
        with self._lock:
            if self._stats.state == "ended":
                raise EndOfStream(self.name)
            if self._closed.is_set() or self._stats.state == "closed":
                raise SourceError(f"source {self.name} is closed")
            return self._read_locked(timeout)

    def _read_locked(self, timeout: float) -> Optional[Frame]:
        if self._inner is None and not self._try_reopen(timeout):
            return None
        inner = self._inner
        assert inner is not None
        try:
            frame = inner.read(timeout)
        except EndOfStream:
            self._stats.state = "ended"
            self._drop_inner()
            raise
        except Exception as exc:  # any backend failure is transient from here on
            self._fail(f"read failed: {_one_line(exc)}")
            return None
        now = time.monotonic()
        if frame is None:
            if self.stall_timeout_s > 0 and now - self._last_frame_mono > self.stall_timeout_s:
                self._stats.stalls += 1
                self._fail(f"no frame for {now - self._last_frame_mono:.1f} s (stall)")
            return None
        self._last_frame_mono = now
        self._delay = self.backoff_initial_s
        self._seq += 1
        self._stats.frames += 1
        return dataclasses.replace(frame, seq=self._seq, source=self.name)

    def close(self) -> None:
        """Idempotent; callable from another thread (waits for an in-flight read)."""
        self._closed.set()
        with self._lock:
            self._drop_inner()
            if self._stats.state != "ended":
                self._stats.state = "closed"

    def stats(self) -> Dict[str, Any]:
        """Counters as a dict (a snapshot; safe to call from another thread)."""
        snap = dataclasses.replace(self._stats)
        inner_skipped = getattr(self._inner, "skipped", 0)
        snap.skipped += int(inner_skipped or 0)
        return snap.as_dict()

    def __enter__(self) -> "ReopeningSource":
        self.open()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- internals ---------------------------------------------------------------------------

    def _fail(self, why: str) -> None:
        self._stats.errors += 1
        self._stats.last_error = why
        self._stats.state = "down"
        self._drop_inner()
        self._retry_at = time.monotonic() + self._delay
        log.warning("source %s: %s; reopening in %.1f s", self.name, why, self._delay)
        self._delay = min(self._delay * 2, self.backoff_max_s) if self._delay > 0 else 0.0

    def _try_reopen(self, timeout: float) -> bool:
        """Wait (at most ``timeout``) for the backoff to pass, then try one reopen."""
        wait = self._retry_at - time.monotonic()
        if wait > 0:
            if wait > timeout:
                self._closed.wait(timeout)
                return False
            if self._closed.wait(wait):
                return False
        inner = self._factory()
        _hint(inner, self._decode_hint)
        try:
            inner.open()
        except Exception as exc:
            try:
                inner.close()
            except Exception:
                pass
            self._fail(f"reopen failed: {_one_line(exc)}")
            return False
        self._inner = inner
        self._last_frame_mono = time.monotonic()
        self._stats.reopens += 1
        self._stats.state = "open"
        log.info("source %s: reopened", self.name)
        return True

    def _drop_inner(self) -> None:
        inner, self._inner = self._inner, None
        if inner is None:
            return
        self._stats.skipped += int(getattr(inner, "skipped", 0) or 0)
        try:
            inner.close()
        except Exception as exc:  # closing a dead device may fail too; nothing to do about it
            log.debug("source %s: close failed: %s", self.name, _one_line(exc))


def _hint(inner: Any, hint: Any) -> None:
    set_hint = getattr(inner, "set_decode_hint", None)
    if callable(set_hint):
        set_hint(hint)


def _one_line(exc: BaseException) -> str:
    """The first line of an error, any URL password masked (it goes to logs and stats)."""
    text = mask_url_secrets(str(exc)).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__
