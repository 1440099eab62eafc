"""systemd's sd_notify protocol in pure Python, plus a progress-gated watchdog.

Why not libsystemd/python-systemd: the protocol is one datagram on an AF_UNIX socket, and the
agent must run in venvs and on distros without the bindings. Every function is a no-op that
returns False when ``NOTIFY_SOCKET`` is unset (running in a terminal, in tests, in Docker).

Why the ``Watchdog`` pings only on progress: a timer thread that pings unconditionally keeps
a daemon "alive" while its inference is hung; pinging only when the pipeline reported a newly
processed frame since the last ping makes systemd (``WatchdogSec=``) restart a stuck agent.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from typing import Mapping, Optional

log = logging.getLogger(__name__)


def _address(env: Mapping[str, str]) -> Optional[str]:
    """NOTIFY_SOCKET as a connectable AF_UNIX address ('@name' = abstract namespace)."""
    path = env.get("NOTIFY_SOCKET", "")
    if not path:
        return None
    if path.startswith("@"):
        return "\0" + path[1:]
    if path.startswith("/"):
        return path
    log.debug("NOTIFY_SOCKET %r is not an AF_UNIX address; sd_notify disabled", path)
    return None


def notify(*fields: str, env: Optional[Mapping[str, str]] = None) -> bool:
    """Send ``fields`` ("KEY=value") as one notification; True if a datagram was sent.

    Failures (socket gone, permission) are logged at debug level and return False: losing a
    status message must never take the agent down.
    """
    addr = _address(os.environ if env is None else env)
    if addr is None:
        return False
    message = "\n".join(fields).encode("utf-8")
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(addr)
            sock.sendall(message)
    except OSError as exc:
        log.debug("sd_notify(%r) failed: %s", fields, exc)
        return False
    return True


def ready(status: Optional[str] = None) -> bool:
    """READY=1 (optionally with STATUS=): start-up finished, systemd may order units after us."""
    return notify("READY=1", *([f"STATUS={_one_line(status)}"] if status else []))


def status(text: str) -> bool:
    """STATUS=<text>, shown by ``systemctl status``."""
    return notify(f"STATUS={_one_line(text)}")


def watchdog() -> bool:
    """WATCHDOG=1: one keep-alive ping."""
    return notify("WATCHDOG=1")


def stopping(status: Optional[str] = None) -> bool:
    """STOPPING=1: shutdown started (send on SIGTERM, before draining)."""
    return notify("STOPPING=1", *([f"STATUS={_one_line(status)}"] if status else []))


def reloading(status: Optional[str] = None) -> bool:
    """RELOADING=1 with MONOTONIC_USEC (required by Type=notify-reload); send READY=1 after."""
    usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    extra = [f"STATUS={_one_line(status)}"] if status else []
    return notify("RELOADING=1", f"MONOTONIC_USEC={usec}", *extra)


def watchdog_interval(env: Optional[Mapping[str, str]] = None) -> Optional[float]:
    """Seconds between pings (half of WatchdogSec), or None if no watchdog is armed for us.

    Like sd_watchdog_enabled(): WATCHDOG_USEC must be a positive integer and WATCHDOG_PID, when
    set, must be our pid (a child that inherited the environment must not ping).
    """
    env = os.environ if env is None else env
    try:
        usec = int(env.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    if usec <= 0:
        return None
    pid = env.get("WATCHDOG_PID", "")
    if pid:
        try:
            if int(pid) != os.getpid():
                return None
        except ValueError:
            return None
    return usec / 2e6


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


class Watchdog:
    """Pings WATCHDOG=1 every ``interval`` seconds, but only after ``progress()`` was called.

    ``interval`` defaults to ``watchdog_interval()``; when that is None (no watchdog armed)
    ``start()`` does nothing, so callers need no branching. Before the first ``progress()``
    pings are sent unconditionally for ``startup_grace_s`` (model load, camera warm-up);
    after that, or once progress was seen, a ping needs a ``progress()`` since the last one.
    """

    def __init__(
        self,
        interval: Optional[float] = None,
        startup_grace_s: float = 0.0,
        env: Optional[Mapping[str, str]] = None,
    ) -> None:
        self._env = dict(os.environ if env is None else env)
        self.interval = interval if interval is not None else watchdog_interval(self._env)
        self.startup_grace_s = startup_grace_s
        self._progress = 0
        self._pinged_at = 0
        self._seen_progress = False
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self.pings = 0
        self.missed = 0  # intervals in which no progress was made (ping withheld)
        self._miss_run = 0

    @property
    def enabled(self) -> bool:
        return bool(self.interval) and _address(self._env) is not None

    def progress(self) -> None:
        """Call after each processed frame (cheap: one locked increment)."""
        with self._lock:
            self._progress += 1

    def start(self) -> "Watchdog":
        if not self.enabled or self._thread is not None:
            return self
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="sd-watchdog", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(2.0)
            self._thread = None

    def __enter__(self) -> "Watchdog":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def tick(self, now: float, started: float) -> bool:
        """One interval elapsed: ping if progress was made (or still in the grace period)."""
        with self._lock:
            advanced = self._progress != self._pinged_at
            self._pinged_at = self._progress
            if advanced:
                self._seen_progress = True
        in_grace = not self._seen_progress and now - started < self.startup_grace_s
        if advanced or in_grace:
            self._miss_run = 0
            if notify("WATCHDOG=1", env=self._env):
                self.pings += 1
            return True
        self.missed += 1
        self._miss_run += 1
        if self._miss_run == 1 or self._miss_run % 10 == 0:
            log.warning("watchdog: no pipeline progress in %.1f s; withholding WATCHDOG=1", self.interval)
        return False

    def _run(self) -> None:
        assert self.interval
        started = time.monotonic()
        while not self._stop.wait(self.interval):
            self.tick(time.monotonic(), started)
