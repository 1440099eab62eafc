"""Receiving a deployed model's bytes into the store: inline chunks (written in place as they come,
in any order, each once) or a URL download (size-capped and deadline-bound), then the size and
sha256 verified. Failures are one line naming their cause (``DeployFailed``).
"""

from __future__ import annotations

import base64
import errno
import http.client
import os
import socket
import threading
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Callable, Dict, List, Optional, Set, Tuple

from edge_agent.config import mask_url_secrets
from edge_agent.models.store import sha256_file
from edge_agent.remote.deploy_request import DeployFailed

CHUNK_WAIT_S = 1.0  # longest sleep between two looks at a stalled inline transfer


def storage_problem(exc: OSError) -> str:
    """One line for a failed write into the model store (disk full, read-only, permissions)."""
    if exc.errno == errno.ENOSPC:
        return "no space left on the device (agent.state_dir)"
    if exc.errno == errno.EDQUOT:
        return "disk quota exceeded (agent.state_dir)"
    if exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        return f"the model store is not writable: {exc.strerror} (agent.state_dir)"
    return f"cannot write to the model store: {exc.strerror or exc}"


class ChunkAssembler:
    """Writes chunks (any order, duplicates ignored) at their offsets into one file.

    Every chunk but the last must be exactly ``chunk_size`` bytes and the last the remainder, so
    a chunk is checked on arrival and memory holds none of them.  Thread-safe; ``wait`` returns
    when complete, failed, or after ``idle_timeout_s`` without a new chunk.
    """

    def __init__(self, path: Path, size: int, count: int, chunk_size: int) -> None:
        self.path, self.size, self.count, self.chunk_size = path, size, count, chunk_size
        self._fd = os.open(str(path), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        self._received: Set[int] = set()
        self._cond = threading.Condition()
        self._last = time.monotonic()
        self.bytes = 0
        self.duplicates = 0
        self.error: Optional[str] = None
        self.storage_failed = False

    def expected_length(self, n: int) -> int:
        return self.chunk_size if n < self.count - 1 else self.size - self.chunk_size * (self.count - 1)

    def add(self, n: int, data: bytes) -> None:
        with self._cond:
            if self.error is not None or self._fd < 0:
                return
            self._last = time.monotonic()
            if not 0 <= n < self.count:
                self.error = f"chunk {n} is out of range (the transfer has {self.count} chunks)"
            elif n in self._received:
                self.duplicates += 1
                return
            elif len(data) != self.expected_length(n):
                self.error = f"chunk {n} has {len(data)} bytes, expected {self.expected_length(n)}"
            else:
                try:
                    _pwrite_all(self._fd, data, n * self.chunk_size)
                except OSError as exc:  # disk full, I/O error: fail the transfer at once
                    self.error = f"{storage_problem(exc)}: transfer stopped, the partial file removed"
                    self.storage_failed = True
                else:
                    self._received.add(n)
                    self.bytes += len(data)
            self._cond.notify_all()

    def fail(self, reason: str) -> None:
        with self._cond:
            self.error = self.error or reason
            self._cond.notify_all()

    @property
    def complete(self) -> bool:
        return len(self._received) == self.count

    def missing(self, limit: int = 10) -> List[int]:
        with self._cond:
            return [n for n in range(self.count) if n not in self._received][:limit]

    def wait(self, idle_timeout_s: float, on_progress: Callable[[int], None]) -> None:
        """Until all chunks arrived; raises DeployFailed on a bad chunk or an idle timeout."""
        with self._cond:
            while self.error is None and not self.complete:
                idle = time.monotonic() - self._last
                if idle >= idle_timeout_s:
                    missing = [n for n in range(self.count) if n not in self._received]
                    shown = ", ".join(map(str, missing[:10])) + (" ..." if len(missing) > 10 else "")
                    raise DeployFailed(f"transfer incomplete: no chunk for {idle_timeout_s:g} s; "
                                       f"{len(missing)} of {self.count} chunks missing ({shown})")
                self._cond.wait(min(CHUNK_WAIT_S, idle_timeout_s - idle))
                received = self.bytes
                self._cond.release()
                try:
                    on_progress(received)
                finally:
                    self._cond.acquire()
            if self.error is not None:
                raise DeployFailed(self.error if self.storage_failed else f"transfer refused: {self.error}")

    def close(self) -> None:
        with self._cond:
            if self._fd >= 0:
                try:
                    if self.error is None:
                        os.fsync(self._fd)
                finally:
                    os.close(self._fd)
                    self._fd = -1
            if self.error is None and not self.complete:
                self.error = "transfer abandoned"
            self._cond.notify_all()


def _pwrite_all(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        view, offset = view[written:], offset + written


MAX_REDIRECTS = 5


class _Deadline:
    """One deadline for a whole download: a watchdog shuts the current socket down when it passes,
    so no step (connect, a trickled status line or header, a redirect, a body read) can outlive it;
    ``abort`` does the same at once (the agent stopping)."""

    def __init__(self, timeout_s: float) -> None:
        self.at = time.monotonic() + timeout_s
        self.expired = False
        self.aborted = False
        self._lock = threading.Lock()
        self._sock: Optional[socket.socket] = None
        self._timer = threading.Timer(timeout_s, self._expire)
        self._timer.daemon = True
        self._timer.start()

    def left(self) -> float:
        return self.at - time.monotonic()

    def watch(self, sock: Optional[socket.socket]) -> None:
        with self._lock:
            self._sock = sock
            late = self.expired or self.aborted
        if late:
            self._shut()

    def _shut(self) -> None:
        with self._lock:
            sock = self._sock
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def _expire(self) -> None:
        self.expired = True
        self._shut()

    def abort(self) -> None:
        self.aborted = True
        self._shut()

    def cancel(self) -> None:
        self._timer.cancel()


def _connection(url: str, timeout_s: float) -> Tuple[http.client.HTTPConnection, str, Dict[str, str]]:
    """The connection for ``url``, the request target and extra headers; through the proxy that
    ``http_proxy``/``https_proxy`` name unless ``no_proxy`` covers the host (as urllib would)."""
    parts = urllib.parse.urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https") or not parts.hostname:
        raise DeployFailed(f"cannot download {mask_url_secrets(url)}: only http:// and https:// URLs")
    cls = http.client.HTTPSConnection if scheme == "https" else http.client.HTTPConnection
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    timeout = max(0.001, timeout_s)
    try:
        port = parts.port
    except ValueError:
        raise DeployFailed(f"cannot download {mask_url_secrets(url)}: bad port") from None
    proxy = urllib.request.getproxies().get(scheme)
    if not proxy or urllib.request.proxy_bypass(parts.hostname):
        return cls(parts.hostname, port, timeout=timeout), target, {}
    p = urllib.parse.urlsplit(proxy if "://" in proxy else f"http://{proxy}")
    if not p.hostname:
        raise DeployFailed(f"{scheme}_proxy {mask_url_secrets(proxy)}: not a proxy URL")
    auth = {}
    if p.username is not None:
        token = f"{urllib.parse.unquote(p.username)}:{urllib.parse.unquote(p.password or '')}"
        auth = {"Proxy-Authorization": "Basic " + base64.b64encode(token.encode()).decode("ascii")}
    if scheme == "https":  # a CONNECT tunnel through the proxy, TLS to the server itself
        conn = http.client.HTTPSConnection(p.hostname, p.port or 8080, timeout=timeout)
        conn.set_tunnel(parts.hostname, port or 443, headers=auth)
        return conn, target, {}
    absolute = urllib.parse.urlunsplit((scheme, parts.netloc.rsplit("@", 1)[-1], parts.path or "/", parts.query, ""))
    return http.client.HTTPConnection(p.hostname, p.port or 8080, timeout=timeout), absolute, auth


def fetch_url(url: str, path: Path, limit: int, timeout_s: float, on_progress: Callable[[int], None],
              on_connected: Callable[[Callable[[], None]], None] = lambda abort: None) -> None:
    """Download ``url`` into ``path``: at most ``limit`` bytes, within ``timeout_s`` OVERALL.

    ``timeout_s`` (``deploy.url_timeout_s``) is ONE deadline for the whole download: connecting,
    the status line and headers, up to ``MAX_REDIRECTS`` redirects (http/https only) and the body.
    A server trickling a byte at a time anywhere, or a chain of slow redirects, must not hold the
    one deployment slot: a watchdog shuts the socket down at the deadline (name resolution is the
    resolver's own timeout). ``on_progress(received)`` after every block (the caller throttles);
    ``on_connected(abort)`` hands out a function that ends the download at once from another
    thread (the agent stopping). Failures are one line (``DeployFailed``), URL passwords masked;
    ``path`` is the caller's to remove."""
    shown = mask_url_secrets(url)  # the reasons go over MQTT and into logs: no URL password
    timed_out = (f"download timed out after {timeout_s:g} s (deploy.url_timeout_s limits the whole "
                 "download: connect, headers, redirects and body)")
    deadline = _Deadline(timeout_s)
    on_connected(deadline.abort)
    total, hops, current = 0, 0, url
    conn: Optional[http.client.HTTPConnection] = None
    try:
        while True:
            if deadline.left() <= 0:
                raise DeployFailed(timed_out)
            conn, target, extra = _connection(current, deadline.left())
            conn.connect()
            deadline.watch(conn.sock)
            conn.request("GET", target, headers={"User-Agent": "edge-agent", "Accept-Encoding": "identity", **extra})
            resp = conn.getresponse()
            if resp.status in (301, 302, 303, 307, 308):
                location = resp.getheader("Location")
                conn.close()
                hops += 1
                if not location:
                    raise DeployFailed(f"cannot download {shown}: HTTP {resp.status} without a Location")
                if hops > MAX_REDIRECTS:
                    raise DeployFailed(f"cannot download {shown}: more than {MAX_REDIRECTS} redirects")
                current = urllib.parse.urljoin(current, location)
                continue
            if resp.status != 200:
                raise DeployFailed(f"cannot download {shown}: HTTP {resp.status} {resp.reason}")
            break
        length = resp.getheader("Content-Length")
        if length and length.isdigit() and int(length) > limit:
            raise DeployFailed(f"download refused: {shown} has {length} bytes, more than the {limit} expected")
        with open(path, "wb") as out:
            while True:
                left = deadline.left()
                if left <= 0:
                    raise DeployFailed(timed_out)
                if conn.sock is not None:
                    conn.sock.settimeout(left)
                block = resp.read1(1 << 16)
                if not block:
                    break
                total += len(block)
                if total > limit:
                    raise DeployFailed(f"download refused: {shown} sends more than the {limit} bytes expected")
                try:
                    out.write(block)
                except OSError as exc:
                    raise DeployFailed(f"{storage_problem(exc)}: download stopped, the partial file "
                                       "removed") from None
                on_progress(total)
            if deadline.expired or deadline.aborted:  # the watchdog's shutdown reads as a clean end
                raise DeployFailed(timed_out if deadline.expired else "download abandoned")
            if length and length.isdigit() and total < int(length):
                raise DeployFailed(f"cannot download {shown}: the connection closed after {total} of "
                                   f"{length} bytes")
            try:
                out.flush()
                os.fsync(out.fileno())
            except OSError as exc:
                raise DeployFailed(storage_problem(exc)) from None
    except DeployFailed as exc:
        if deadline.expired and "timed out" not in str(exc):
            raise DeployFailed(timed_out) from None
        raise
    except (OSError, http.client.HTTPException) as exc:  # refused, reset, cut off, TLS, the watchdog
        if deadline.expired or isinstance(exc, TimeoutError):  # every socket timeout is the time left
            raise DeployFailed(timed_out) from None
        if deadline.aborted:
            raise DeployFailed("download abandoned") from None
        reason = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
        raise DeployFailed(f"cannot download {shown}: {mask_url_secrets(str(reason))}") from None
    finally:
        deadline.cancel()
        if conn is not None:
            conn.close()


def verify_file(path: Path, size: int, sha: str) -> None:
    actual_size = path.stat().st_size
    if actual_size != size:
        raise DeployFailed(f"size mismatch: received {actual_size} bytes, the request says {size}")
    actual = sha256_file(path)
    if actual != sha:
        raise DeployFailed(f"sha256 mismatch: received {actual}, the request says {sha}")
