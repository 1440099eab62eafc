"""Store-and-forward: a bounded, persistent outbox for results and masks the broker did not get.

While the broker is unreachable (or the client cannot take a message: too many in flight) the
agent's results and masks go into a SQLite database in the state directory (WAL mode,
``synchronous = FULL``: a message ``put()`` has returned for survives a SIGKILL and a power loss).
After the reconnect :class:`Replayer` sends them back in capture order at QoS 1, at most
``outbox.replay_max_hz`` messages a second and only while few messages are in flight, so live
frames keep flowing; a row is deleted once the broker acknowledged it (at least once: a crash
between the acknowledgement and the delete sends it again, same payload, same ``seq``).

Two byte budgets (results, masks): beyond one, the oldest messages of that budget are deleted and
counted (``dropped``). Replayed messages are marked (:func:`mark_replayed`); the story and the
numbers are in docs/daemon.md ("Store-and-forward") and docs/performance.md.

Generic over (topic, payload, qos, time): nothing here knows about cameras or frames.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Set

from edge_agent.output import png
from edge_agent.output.png import PNG_SIGNATURE

log = logging.getLogger(__name__)

RESULTS, MASKS = "results", "masks"  # the two budgets
FILENAME = "outbox.sqlite3"
REPLAYED_PROPERTY = ("replayed", "true")  # MQTT 5 user property of every replayed message
REPLAYED_PNG_KEY = b"edge-agent-replayed"  # tEXt keyword of a replayed mask
_SCHEMA = """
CREATE TABLE IF NOT EXISTS outbox (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    ts REAL NOT NULL,          -- when the message was first handed to publish (Unix time)
    bucket TEXT NOT NULL,      -- results | masks: whose budget it counts against
    topic TEXT NOT NULL,
    qos INTEGER NOT NULL,
    payload BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS outbox_order ON outbox (ts, id);
CREATE INDEX IF NOT EXISTS outbox_bucket ON outbox (bucket, ts, id);
"""


@dataclass(frozen=True)
class Row:
    id: int
    ts: float
    bucket: str
    topic: str
    qos: int
    payload: bytes


def mark_replayed(payload: bytes) -> bytes:
    """The payload a consumer can tell is replayed, whatever the MQTT version: a JSON object gains
    ``"replayed": true``, a PNG a ``tEXt`` chunk ``replayed`` = ``true`` right after IHDR (where
    the frame label is too); anything else is returned as is (the MQTT 5 user property
    ``replayed: true`` marks every replayed message)."""
    if payload[:1] == b"{":
        try:
            doc = json.loads(payload)
        except ValueError:
            return payload
        if isinstance(doc, dict):
            doc["replayed"] = True
            return json.dumps(doc, separators=(",", ":")).encode("utf-8")
        return payload
    if payload.startswith(PNG_SIGNATURE):
        return png.insert_text(payload, REPLAYED_PNG_KEY, b"true")
    return payload


def is_replayed(payload: bytes) -> bool:
    """True for a payload :func:`mark_replayed` marked (for consumers under MQTT 3.1.1 and tests)."""
    if payload[:1] == b"{":
        try:
            doc = json.loads(payload)
        except ValueError:
            return False
        return isinstance(doc, dict) and doc.get("replayed") is True
    if payload.startswith(PNG_SIGNATURE):
        return png.read_text(payload, REPLAYED_PNG_KEY) == b"true"
    return False


class Outbox:
    """The queue: ``put`` (oldest-first eviction beyond a budget), ``oldest``, ``delete``, ``stats``.

    Thread-safe (one connection, one lock). ``max_bytes``/``mask_max_bytes``: the budgets of the
    two buckets in payload bytes (0 = that bucket is not stored); ``replay_max_hz``: for the
    :class:`Replayer`.
    """

    def __init__(self, path: Path, max_bytes: int, mask_max_bytes: int, replay_max_hz: float = 50.0) -> None:
        self.path = Path(path)
        self.budgets = {RESULTS: int(max_bytes), MASKS: int(mask_max_bytes)}
        self.replay_max_hz = replay_max_hz
        self._lock = threading.Lock()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = self._open()
        self._count = {RESULTS: 0, MASKS: 0}
        self._bytes = {RESULTS: 0, MASKS: 0}
        for bucket, count, size in self._db.execute(
                "SELECT bucket, COUNT(*), COALESCE(SUM(LENGTH(payload)), 0) FROM outbox GROUP BY bucket"):
            if bucket in self._count:
                self._count[bucket], self._bytes[bucket] = int(count), int(size)
        self.counters = {"stored": 0, "dropped": 0, "errors": 0}
        self._replayed = 0
        self._counter_lock = threading.Lock()
        self.last_error: Optional[str] = None
        self.recovered = sum(self._count.values())  # what a previous run left behind
        # budgets lowered since then: the oldest beyond them go now
        for bucket in (RESULTS, MASKS):
            with self._lock:
                self._evict(bucket, 0)

    def _open(self) -> sqlite3.Connection:
        try:
            return self._connect()
        except sqlite3.DatabaseError as exc:  # not a database (a torn file from elsewhere): keep it aside
            aside = self.path.with_name(f"{self.path.name}.corrupt-{int(time.time())}")
            log.error("outbox %s is unreadable (%s): moved to %s, starting an empty one", self.path, exc, aside)
            os.replace(self.path, aside)
            for suffix in ("-wal", "-shm"):
                try:
                    os.unlink(f"{self.path}{suffix}")
                except FileNotFoundError:
                    pass
            return self._connect()

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(str(self.path), timeout=10.0, isolation_level=None, check_same_thread=False)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")  # a committed put survives a power loss
            db.execute("PRAGMA journal_size_limit=4194304")
            db.executescript(_SCHEMA)
            db.execute("SELECT COUNT(*) FROM outbox").fetchone()
        except sqlite3.DatabaseError:
            db.close()
            raise
        return db

    # -- the queue ---------------------------------------------------------------------------
    @contextlib.contextmanager
    def _transaction(self) -> Iterator[None]:
        """BEGIN IMMEDIATE ... COMMIT, rolled back on any error (lock held)."""
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield
            self._db.execute("COMMIT")
        except BaseException:
            self._db.execute("ROLLBACK")
            raise

    def put(self, topic: str, payload: bytes, qos: int, ts: float, bucket: str = RESULTS) -> Optional[int]:
        """Store one message (committed when this returns); its row id, or None when its budget is
        0 or it alone exceeds it (counted as dropped) or the database failed (counted as error)."""
        size = len(payload)
        budget = self.budgets[bucket]
        with self._lock:
            if size > budget:
                self.counters["dropped"] += 1
                return None
            try:
                with self._transaction():
                    self._evict(bucket, size)
                    cur = self._db.execute("INSERT INTO outbox (ts, bucket, topic, qos, payload) VALUES (?, ?, ?, ?, ?)",
                                           (ts, bucket, topic, qos, sqlite3.Binary(payload)))
            except sqlite3.Error as exc:
                self._failed(exc)
                self._recount()
                return None
            self._count[bucket] += 1
            self._bytes[bucket] += size
            self.counters["stored"] += 1
            return int(cur.lastrowid)

    def _evict(self, bucket: str, incoming: int) -> None:
        """Delete the oldest rows of ``bucket`` until ``incoming`` more bytes fit (lock held)."""
        budget = self.budgets[bucket]
        while self._count[bucket] and self._bytes[bucket] + incoming > budget:
            rows = self._db.execute(
                "SELECT id, LENGTH(payload) FROM outbox WHERE bucket = ? ORDER BY ts, id LIMIT 64",
                (bucket,)).fetchall()
            if not rows:
                self._count[bucket] = self._bytes[bucket] = 0
                return
            victims = []
            for row_id, size in rows:
                victims.append(row_id)
                self._count[bucket] -= 1
                self._bytes[bucket] -= int(size)
                self.counters["dropped"] += 1
                if self._bytes[bucket] + incoming <= budget:
                    break
            self._db.executemany("DELETE FROM outbox WHERE id = ?", [(i,) for i in victims])

    def oldest(self, limit: int, exclude: Iterable[int] = ()) -> List[Row]:
        """Up to ``limit`` rows in delivery order (capture time, then arrival), skipping ``exclude``."""
        skip: Set[int] = set(exclude)
        with self._lock:
            try:
                rows = self._db.execute(
                    "SELECT id, ts, bucket, topic, qos, payload FROM outbox ORDER BY ts, id LIMIT ?",
                    (limit + len(skip),)).fetchall()
            except sqlite3.Error as exc:
                self._failed(exc)
                return []
        return [Row(int(i), float(ts), b, t, int(q), bytes(p)) for i, ts, b, t, q, p in rows if i not in skip][:limit]

    def delete(self, ids: Iterable[int]) -> int:
        """Delete delivered rows (one transaction); how many existed."""
        ids = list(ids)
        if not ids:
            return 0
        with self._lock:
            try:
                with self._transaction():
                    gone = []
                    for row_id in ids:
                        row = self._db.execute("SELECT bucket, LENGTH(payload) FROM outbox WHERE id = ?",
                                               (row_id,)).fetchone()
                        if row is not None:
                            self._db.execute("DELETE FROM outbox WHERE id = ?", (row_id,))
                            gone.append(row)
            except sqlite3.Error as exc:
                self._failed(exc)
                return 0
            for bucket, size in gone:
                if bucket in self._count:
                    self._count[bucket] -= 1
                    self._bytes[bucket] -= int(size)
            return len(gone)

    def count_replayed(self) -> None:
        """One more replayed message acknowledged (never waits for a database operation: called
        on the MQTT network thread)."""
        with self._counter_lock:
            self._replayed += 1

    def _failed(self, exc: Exception) -> None:
        self.counters["errors"] += 1
        first = self.last_error is None
        self.last_error = f"{type(exc).__name__}: {exc}"
        (log.error if first else log.debug)("outbox %s: %s", self.path, self.last_error)

    def _recount(self) -> None:
        try:
            for bucket in (RESULTS, MASKS):
                count, size = self._db.execute(
                    "SELECT COUNT(*), COALESCE(SUM(LENGTH(payload)), 0) FROM outbox WHERE bucket = ?",
                    (bucket,)).fetchone()
                self._count[bucket], self._bytes[bucket] = int(count), int(size)
        except sqlite3.Error:
            pass

    # -- what stats show ----------------------------------------------------------------------
    def __len__(self) -> int:
        with self._lock:
            return sum(self._count.values())

    def stats(self, now: Optional[float] = None) -> Dict[str, Any]:
        """``messages``/``bytes`` queued now (``masks``: how many of them are masks), ``oldest_s``
        (age of the oldest, null when empty), since the start: ``stored``, ``dropped`` (beyond a
        budget), ``replayed`` (acknowledged by the broker), ``errors``; ``recovered``: queued by
        an earlier run."""
        now = time.time() if now is None else now
        with self._lock:
            oldest = None
            if sum(self._count.values()):
                try:
                    oldest = self._db.execute("SELECT MIN(ts) FROM outbox").fetchone()[0]
                except sqlite3.Error:
                    oldest = None
            doc: Dict[str, Any] = {
                "messages": sum(self._count.values()),
                "bytes": sum(self._bytes.values()),
                "masks": self._count[MASKS],
                "oldest_s": None if oldest is None else round(max(0.0, now - float(oldest)), 1),
                **self.counters,
                "replayed": self._replayed,
                "recovered": self.recovered,
                "last_error": self.last_error,
            }
        return doc

    def close(self) -> None:
        with self._lock:
            try:
                self._db.close()
            except sqlite3.Error:
                pass


def open_outbox(config: Any) -> Optional[Outbox]:
    """The agent's outbox (``[outbox]``, in ``agent.state_dir``); None when disabled or when it
    cannot be opened (logged: the agent then runs as without one, dropping while disconnected)."""
    cfg = config.outbox
    if not cfg.enabled:
        return None
    path = Path(config.agent.state_dir) / FILENAME
    try:
        outbox = Outbox(path, int(cfg.max_mb * 1e6), int(cfg.mask_max_mb * 1e6), cfg.replay_max_hz)
    except (OSError, sqlite3.Error) as exc:
        log.error("outbox: cannot open %s (%s): results are dropped while the broker is away "
                  "(set agent.state_dir to a writable directory, or outbox.enabled = false)", path, exc)
        return None
    if outbox.recovered:
        log.info("outbox: %d messages from before the restart to deliver (%s)", outbox.recovered, path)
    return outbox


Send = Callable[[Row], Optional[int]]  # publish a replayed row; the MQTT mid, None if not taken


class Replayer:
    """The thread that sends the outbox back: oldest first, paced, only while ``ready()``.

    ``send(row)`` publishes (marked, QoS 1) and returns the mid; the owner calls :meth:`acked`
    with the row id once the broker acknowledged it. Rows sent and not yet acknowledged are
    ``held`` (not sent again by this process: the MQTT client retransmits them itself after a
    reconnect) until :meth:`release_all` (the client was replaced: its retransmissions are gone).
    """

    BATCH = 32

    def __init__(self, outbox: Outbox, send: Send, ready: Callable[[], bool], max_hz: float) -> None:
        self.outbox = outbox
        self.send = send
        self.ready = ready
        self.interval = 1.0 / max_hz
        self._held: Set[int] = set()
        self._acked: List[int] = []
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="outbox-replay", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
        self._flush()

    def wake(self) -> None:
        """Something changed (connected, a message stored, in-flight went down): look again."""
        self._wake.set()

    def hold(self, row_id: int) -> None:
        """A row the MQTT client will retransmit itself (it was in flight at a disconnect)."""
        with self._lock:
            self._held.add(row_id)

    def acked(self, row_id: int, replayed: bool = True) -> None:
        with self._lock:
            self._acked.append(row_id)
        if replayed:
            self.outbox.count_replayed()

    def release(self, row_id: int) -> None:
        """Not taken after all (refused by the client): may be sent again."""
        with self._lock:
            self._held.discard(row_id)

    def release_all(self) -> None:
        with self._lock:
            self._held = set(self._acked)  # acknowledged ones stay out until deleted
        self._wake.set()

    def _flush(self) -> None:
        with self._lock:
            done, self._acked = self._acked, []
        if done:
            self.outbox.delete(done)
            with self._lock:
                self._held.difference_update(done)

    def _run(self) -> None:
        next_send = time.monotonic()
        while not self._stop.is_set():
            self._flush()
            if not self.ready():
                self._wake.wait(0.2)
                self._wake.clear()
                continue
            with self._lock:
                held = set(self._held)
            rows = self.outbox.oldest(self.BATCH, exclude=held)
            if not rows:
                self._wake.wait(0.5 if held else 2.0)
                self._wake.clear()
                continue
            for row in rows:
                delay = next_send - time.monotonic()
                if delay > 0 and self._stop.wait(delay):
                    return
                if not self.ready():
                    break
                with self._lock:
                    self._held.add(row.id)
                if self.send(row) is None:
                    self.release(row.id)
                    break
                next_send = max(next_send + self.interval, time.monotonic() - self.interval)
