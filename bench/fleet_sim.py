#!/usr/bin/env python3
"""Many simulated devices in one process, speaking the agent's real protocol (issue 30 item 3).

    .venv/bin/python bench/fleet_sim.py --devices 1000 --port 1883 [--fps 0.2] [--cost SHA=MS ...]

Each simulated device IS an :class:`edge_agent.daemon.agent.Agent` (its info document, handler
table, stop sequence), with its own real :class:`~edge_agent.comms.mqtt.MqttComms` (one MQTT
connection per device, as the broker would see a fleet), the real command handlers of
:data:`edge_agent.remote.HANDLERS` (presence, benchmark queueing and answers, the deploy handshake
with chunks, sha256 verification, the store's pointers, confirmation, rollback and cmd/models),
the real :class:`~edge_agent.daemon.model_manager.ModelManager` and :class:`ModelStore` (one
state directory per device) and the real :class:`~edge_agent.daemon.telemetry.Telemetry` for
``stats`` and ``timings``. Only inference is simulated: a model is any file, and its "inference"
costs a configurable number of milliseconds per model sha256 (:class:`Costs`); a deployed model
therefore changes the fps and p50 a device reports, and a rollout gate can fail on it.

What is not real: no camera and no interpreter (frames are clock ticks of ONE thread for every
device, ``result`` messages carry an empty class list), ``bench --pipeline`` requests fail (no
label maps), and a device runs as fast as ``min(source fps, 1000 / cost)``. A benchmark request
is received, validated, queued and answered by the agent's own :class:`RemoteBench` code; only its
runs are virtual (:class:`SimBench`: each invoke advances a clock by the model's cost, no frames
are built, no sleep) and they run on ONE small pool shared by every device.
Threads: one network thread for every client (:class:`NetLoop`), one clock thread, the shared
benchmark pool; the command answers of every device are sent from the network loop
(:class:`LoopOutbox`), not from an outbox thread per device and command (numbers in
docs/performance.md, "Simulated fleet").
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import heapq
import itertools
import logging
import random
import selectors
import signal
import socket
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402

import paho.mqtt.client as paho  # noqa: E402

from edge_agent.comms.commands import OUTBOX_LIMIT, CommandChannel, Outbox, Request  # noqa: E402
from edge_agent.comms.connection import MqttConnection  # noqa: E402
from edge_agent.config import Config, load_config  # noqa: E402
from edge_agent.daemon.agent import Agent  # noqa: E402
from edge_agent.daemon.model_manager import ModelManager  # noqa: E402
from edge_agent.daemon.pipeline import PipelineSettings  # noqa: E402
from edge_agent.daemon.telemetry import Telemetry  # noqa: E402
from edge_agent.errors import EdgeAgentError  # noqa: E402
from edge_agent.inference.labels import labels_for  # noqa: E402
from edge_agent.inference.preprocess import Geometry  # noqa: E402
from edge_agent.models import catalog  # noqa: E402
from edge_agent.output import benchmark as bench  # noqa: E402
from edge_agent.output import stages  # noqa: E402
from edge_agent.remote import HANDLERS  # noqa: E402
from edge_agent.remote.bench import RemoteBench, _Progress  # noqa: E402

log = logging.getLogger("fleet_sim")

DEFAULT_COST_MS = 40.0
INPUT_SIZE = (257, 257)
TICK_S = 0.1  # the clock thread's period
MAX_FRAMES_PER_TICK = 50  # a device far behind skips frames instead of bursting
THREAD_STACK = 512 * 1024
BENCH_WORKERS = 2  # every device's benchmark runs share these (2 cores here)
VOC = ["background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
       "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tv"]


@dataclasses.dataclass
class Costs:
    """The fake inference cost (ms) of a model by sha256 (or a prefix of >= 8 hex digits), per
    device where ``per_device`` says so; ``fps`` is each device's source rate (0: as fast as the
    model allows), ``device_fps`` overrides it per device."""

    by_sha: Dict[str, float] = dataclasses.field(default_factory=dict)
    default_ms: float = DEFAULT_COST_MS
    fps: float = 1.0
    device_fps: Dict[str, float] = dataclasses.field(default_factory=dict)
    jitter: float = 0.05  # +-5 % per frame

    def cost_ms(self, sha256: str) -> float:
        for key, ms in self.by_sha.items():
            if sha256.startswith(key.lower()):
                return ms
        return self.default_ms

    def source_fps(self, device: str) -> float:
        return self.device_fps.get(device, self.fps)


def fake_model_bytes(name: str, size: int = 32 * 1024) -> bytes:
    """Deterministic bytes standing for a model file (the simulator never parses them)."""
    seed = hashlib.sha256(name.encode()).digest()
    out = bytearray()
    while len(out) < size:
        seed = hashlib.sha256(seed).digest()
        out += seed
    return bytes(out[:size])


# --------------------------------------------------------------------------- one network thread


class NetLoop:
    """Drives every device's paho client from ONE thread (paho's external event loop API:
    ``loop_read``/``loop_write``/``loop_misc`` on a selector). A paho thread per device
    (``loop_start``) meant 1,000 runnable threads fighting for the GIL: CONNACKs were read after
    the 10 s CONNACK deadline and the fleet never got online (docs/performance.md)."""

    def __init__(self) -> None:
        self._sel = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._sel.register(self._wake_r, selectors.EVENT_READ, None)
        self._lock = threading.Lock()
        self._timers: List[Any] = []
        self._seq = itertools.count()
        self._writes: set = set()
        self._clients: Dict[paho.Client, "LoopConnection"] = {}
        self._delays: Dict[paho.Client, float] = {}
        self._stop = threading.Event()
        self.reconnects = 0  # connection attempts that opened a socket (first connects included)
        self.thread = threading.Thread(target=self._run, name="fleet-sim-net", daemon=True)
        self.thread.start()

    def _wake(self) -> None:
        try:
            self._wake_w.send(b"x")
        except (BlockingIOError, OSError):
            pass

    def call_later(self, delay: float, fn: Callable[..., None], *args: Any) -> None:
        with self._lock:
            heapq.heappush(self._timers, (time.monotonic() + delay, next(self._seq), fn, args))
        self._wake()

    def add(self, client: paho.Client, conn: "LoopConnection") -> None:
        client.on_socket_open = lambda c, u, sock: self._opened(c, sock)
        client.on_socket_close = lambda c, u, sock: self._closed(c, sock)
        client.on_socket_register_write = lambda c, u, sock: self._want_write(c)
        client.on_socket_unregister_write = lambda c, u, sock: None
        with self._lock:
            self._clients[client] = conn
        self.call_later(0.0, self._connect, client)

    def _want_write(self, client: paho.Client) -> None:
        with self._lock:
            self._writes.add(client)
        if threading.current_thread() is not self.thread:
            self._wake()

    def _connect(self, client: paho.Client) -> None:
        conn = self._clients.get(client)
        if conn is None or conn.client is not client or conn._stopping:
            self._clients.pop(client, None)
            return
        try:
            client.reconnect()
        except Exception:  # OSError mostly; anything else must not end this device's reconnects
            conn._on_connect_fail(client, None)  # paho's own loop does this on a failed attempt
            self._retry(client, conn)
        else:
            self.reconnects += 1

    def _retry(self, client: paho.Client, conn: "LoopConnection") -> None:
        lo, hi = float(conn.cfg.reconnect_min_s), float(conn.cfg.reconnect_max_s)
        delay = lo if conn.failures == 0 else min(hi, 2 * self._delays.get(client, lo / 2))
        self._delays[client] = delay
        self.call_later(delay, self._connect, client)

    def _opened(self, client: paho.Client, sock: Any) -> None:
        with self._lock:
            self._sel.register(sock, selectors.EVENT_READ, client)

    def _closed(self, client: paho.Client, sock: Any) -> None:
        with self._lock:
            try:
                self._sel.unregister(sock)
            except (KeyError, ValueError):
                pass
            self._writes.discard(client)
        conn = self._clients.get(client)
        if conn is not None and conn.client is client and not conn._stopping:
            self._retry(client, conn)  # paho's loop_forever would reconnect after its delay
        elif conn is not None:
            with self._lock:
                self._clients.pop(client, None)

    def _run(self) -> None:
        next_misc = time.monotonic() + 1.0
        while not self._stop.is_set():
            with self._lock:
                due = self._timers[0][0] if self._timers else None
            now = time.monotonic()
            timeout = min(1.0, max(0.0, (due - now) if due is not None else 1.0), max(0.0, next_misc - now))
            if self._writes:
                timeout = 0.0
            for key, mask in self._sel.select(timeout):
                client = key.data
                if client is None:
                    try:
                        while self._wake_r.recv(4096):
                            pass
                    except (BlockingIOError, OSError):
                        pass
                    continue
                if mask & selectors.EVENT_WRITE:
                    client.loop_write()
                if mask & selectors.EVENT_READ:
                    client.loop_read()
            with self._lock:
                writes, self._writes = self._writes, set()
            for client in writes:
                if client.want_write():
                    client.loop_write()
                self._watch_write(client)
            now = time.monotonic()
            while True:
                with self._lock:
                    if not self._timers or self._timers[0][0] > now:
                        break
                    _, _, fn, args = heapq.heappop(self._timers)
                try:
                    fn(*args)
                except Exception:
                    log.exception("net loop timer failed")
            if now >= next_misc:
                next_misc = now + 1.0
                for client in list(self._clients):
                    client.loop_misc()

    def _watch_write(self, client: paho.Client) -> None:
        """Wait for writability only while paho has bytes it could not write (a full socket)."""
        sock = client.socket()
        if sock is None:
            return
        events = selectors.EVENT_READ | (selectors.EVENT_WRITE if client.want_write() else 0)
        with self._lock:
            try:
                if self._sel.get_key(sock).events != events:
                    self._sel.modify(sock, events, client)
            except (KeyError, ValueError):
                pass

    def close(self) -> None:
        self._stop.set()
        self._wake()
        self.thread.join(5)


class LoopConnection(MqttConnection):
    """The agent's connection policy unchanged, its network I/O on a shared :class:`NetLoop`."""

    net: NetLoop

    def _start_network(self, client: paho.Client) -> None:
        self.net.add(client, self)

    def _arm_connack_timer(self, client: paho.Client, attempt: int) -> None:
        """The CONNACK deadline on the loop's timers (not a thread per attempt)."""
        self.net.call_later(self.connack_timeout_s, self._connack_timeout, client, attempt)


class LoopOutbox(Outbox):
    """A command channel's answers, in order, sent from the shared :class:`NetLoop` (the agent's
    :class:`Outbox` keeps a thread per channel: 4 per device, 4,000 threads for a fleet-wide
    benchmark). Same policy: ``accepted`` and final answers retried until their deadline,
    progress tried once; a retry waits on the loop's timers, never in a thread."""

    def __init__(self, old: Outbox, net: NetLoop) -> None:
        super().__init__(old._comms, old._name)
        self.net = net
        self._pumping = False

    def put(self, item: Any) -> None:
        with self._cond:
            if len(self._queue) >= OUTBOX_LIMIT:
                self.dropped += 1
                log.warning("%s: outbox full, answer dropped", self._name)
                return
            self._queue.append(item)
            if self._pumping:
                return
            self._pumping = True
        self.net.call_later(0.0, self._pump, 0.02)

    def _pump(self, delay: float) -> None:
        while True:
            with self._cond:
                if not self._queue:
                    self._pumping = False
                    self._cond.notify_all()
                    return
                item = self._queue[0]
            if not self._try(item):
                self.net.call_later(delay, self._pump, min(delay * 2, 0.5))
                return
            with self._cond:
                self._queue.popleft()
                self._cond.notify_all()

    def _try(self, item: Any) -> bool:
        """One attempt (Outbox._send's body): True when sent or given up."""
        comms = self._comms()
        sent_topic = getattr(item, "sent_topic", item.suffix is None)
        sent_response = getattr(item, "sent_response", False)
        try:
            sent_topic = sent_topic or comms.publish(item.suffix, item.payload, qos=1)
            if item.response is not None and not sent_response:
                sent_response = comms.reply(item.response[0], item.payload, item.response[1])
            else:
                sent_response = True
        except ValueError as exc:
            log.warning("%s: cannot answer on %s: %s", self._name, item.suffix, exc)
            return True
        item.sent_topic, item.sent_response = sent_topic, sent_response
        if sent_topic and sent_response:
            return True
        if time.monotonic() >= item.deadline:
            self.dropped += 1
            log.warning("%s: answer on %s dropped (broker unavailable)", self._name, item.suffix)
            return True
        return False


class SimBench(RemoteBench):
    """The agent's :class:`RemoteBench` (parsing, validation, model lookup, queue, accepted/
    progress/done answers, cancel on stop); its runs are virtual and run on the fleet's shared
    pool instead of a worker thread per device."""

    def __init__(self, ctx: Any, pool: ThreadPoolExecutor) -> None:
        super().__init__(ctx)
        self.pool = pool

    def _start_workers(self, slots: int) -> None:  # under self._cond, for each accepted request
        self.pool.submit(self._work_one)

    def _work_one(self) -> None:
        """One queued request, if this device has a free slot (RemoteBench._work's body)."""
        with self._cond:
            if not self._queue or self._running >= int(self.limits.max_concurrent):
                return
            request = self._queue.popleft()
            self._running += 1
        try:
            self.run(request)
        except EdgeAgentError as exc:
            request.fail(str(exc))
        except Exception as exc:
            log.exception("benchmark %s crashed", request.id)
            request.fail(f"internal error: {type(exc).__name__}: {exc}")
        finally:
            if not request.finished:
                request.fail("internal error: the benchmark ended without a result")
            with self._cond:
                self._running -= 1
                self._cond.notify_all()
                if self._queue:
                    self.pool.submit(self._work_one)

    def run(self, request: Request) -> None:
        """RemoteBench.run with virtual runs: the result document is the agent's
        (:func:`edge_agent.output.benchmark.run_benchmark`); no frame is built, nothing sleeps."""
        p = request.params
        path, labels = p.get("_model") or self.ctx.models.running_model()
        settings = bench.BenchSettings(
            runs=p["runs"], warmup=p["warmup"], min_secs=p["min_secs"], max_secs=p["max_secs"],
            max_count=int(self.limits.max_runs), pipeline=p["pipeline"], frame_size=p["frame_size"],
            input=p["input"], samples=p["samples"])
        if settings.pipeline:
            raise EdgeAgentError("the simulator has no pipeline to benchmark (pipeline: false only)")
        progress = _Progress(request)
        progress("init", 0, 1)
        segmenter = self.ctx.models.build(path, labels, **({"threads": p["threads"]} if p["threads"] else {}))
        clock = VirtualClock()
        segmenter.model.clock = clock
        w, h = settings.frame_size or (640, 480)
        frame = np.broadcast_to(np.uint8(0), (h, w, 3))  # a shape, no pixels
        context = {"device_id": self.ctx.config().agent.device_id, "live_pipeline": self._live_state(False)}
        result = bench.run_benchmark(segmenter, settings, init_ms=1.0, progress=progress, context=context,
                                     frames=[frame], now=clock, cancelled=lambda: self._stopping is not None)
        if result["stopped"] == "cancelled":
            request.fail(f"cancelled: {self._stopping}", result=result)
        else:
            request.done(result=result)


class VirtualClock:
    """``now()`` for a virtual benchmark: advanced by each fake invoke's cost."""

    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t

    def advance(self, seconds: float) -> None:
        self.t += seconds


def loop_outboxes(handlers: Iterable[Any], net: NetLoop) -> None:
    """Every command channel of these handlers answers from the shared loop (:class:`LoopOutbox`)."""
    for handler in handlers:
        for value in vars(handler).values():
            if isinstance(value, CommandChannel) and not isinstance(value.outbox, LoopOutbox):
                value.outbox = LoopOutbox(value.outbox, net)


# --------------------------------------------------------------------------- the fake model


class FakeModel:
    """What the handlers, the model manager and the benchmark runner ask of a model."""

    def __init__(self, path: str, sha256: str, size: int, labels: List[str], cost_ms: float) -> None:
        self.path = path
        self.file = SimpleNamespace(path=path, name=Path(path).name, sha256=sha256, size=size)
        self.input_size = INPUT_SIZE
        self.labels = labels
        self.output = SimpleNamespace(classes=len(labels), kind="labels")
        self.cost_ms = cost_ms
        self.clock: Optional[VirtualClock] = None  # set for a virtual benchmark

    def describe(self) -> Dict[str, Any]:
        h, w = self.input_size
        return {"name": self.file.name, "path": self.path, "sha256": self.file.sha256,
                "size_bytes": self.file.size, "input_size": [h, w], "input_dtype": "uint8",
                "output_kind": "labels", "output_dtype": "uint8", "labels": self.labels,
                "classes": len(self.labels), "normalization": {"preset": "raw", "source": "simulated"},
                "output": {"name": "simulated", "kind": "labels", "layout": "nhwc",
                           "classes": len(self.labels), "size": [h, w]},
                "runtime": "litert", "runtime_version": "0+simulated", "delegate": None, "threads": 1,
                "fallback_reason": None}

    # the benchmark runner's calls (edge_agent.output.benchmark.run_benchmark)
    def prepare(self, image: np.ndarray, mode: str, out: Any = None, frame_hw: Any = None) -> Any:
        fh, fw = frame_hw or image.shape[:2]
        return None, Geometry(fh, fw, *self.input_size, *self.input_size)

    def set_input(self, prepared: Any) -> None:
        pass

    def invoke(self) -> None:
        if self.clock is not None:
            self.clock.advance(self.cost_ms * random.uniform(0.95, 1.05) / 1e3)
        else:
            time.sleep(self.cost_ms / 1e3)


class FakeSegmenter:
    """A segmenter whose "inference" is a sleep of the model's cost; masks are all background."""

    mode = "letterbox"

    def __init__(self, model: FakeModel) -> None:
        self.model = model
        self.labels = model.labels

    def segment(self, frame: np.ndarray, full_mask: bool = True) -> Any:
        time.sleep(min(self.model.cost_ms, 5000.0) / 1e3)
        return SimpleNamespace(mask=np.zeros(frame.shape[:2], np.uint8),
                               timings={"inference": self.model.cost_ms})

    def info(self) -> Dict[str, Any]:
        info = self.model.describe()
        info["preprocess"] = self.mode
        return info

    def describe_runtime(self) -> str:
        return f"simulated inference ({self.model.cost_ms:g} ms)"


class SimModels(ModelManager):
    """The real model manager (store, trust, activation, confirmation, undo); models are fakes."""

    def __init__(self, config: Config, host: Any, sim: "FleetSim") -> None:
        super().__init__(config, host)
        self.sim = sim

    def build(self, path: str, labels: Any, **changes: Any) -> Any:
        try:
            sha = catalog.sha256_file(path)
            size = Path(path).stat().st_size
        except OSError as exc:
            raise EdgeAgentError(f"cannot read the model: {exc.strerror}") from None
        names = labels_for(labels) if labels else None
        return FakeSegmenter(FakeModel(path, sha, size, names or list(self.sim.labels), self.sim.costs.cost_ms(sha)))


# --------------------------------------------------------------------------- the fake pipeline


class SimPipeline:
    """Frames as clock ticks: the real Telemetry (stats, interval timings) and result documents."""

    def __init__(self, agent: "SimAgent", segmenter: FakeSegmenter) -> None:
        self.agent = agent
        self.segmenter = segmenter
        self.sink = agent.comms
        s = PipelineSettings.from_config(agent.config)
        self.telemetry = Telemetry(agent.comms, s.timings, s.timings_interval_s, s.stats_interval_s, self._state)
        self.source = None
        self.seq = 0
        self._paused = False
        self._next = time.monotonic()
        self._rand = random.Random(agent.config.agent.device_id)
        self._last_mask_seq: Optional[int] = None
        self.encode_options = stages.EncodeOptions(mask=False, overlay=False, result=agent.config.publish.result)
        # A random phase per device for frames, timings and stats: devices start within a second
        # or two, and in phase 1,000 stats documents would go out in the same tick.
        self._next += self._rand.uniform(0, self.interval_s())
        t = self.telemetry
        t._next_timings += self._rand.uniform(0, t.timings_interval_s)
        t._next_stats += self._rand.uniform(0, t.stats_interval_s)

    @property
    def counters(self) -> Any:
        return self.telemetry.counters

    @property
    def fps(self) -> float:
        return self.telemetry.fps

    @property
    def finished(self) -> bool:
        return False

    def healthy(self, inference_timeout_s: float) -> bool:
        return True

    def stuck_for(self) -> float:
        return 0.0

    def pause(self, timeout: float = 30.0) -> bool:
        self._paused = True
        return True

    def resume(self) -> None:
        self._paused = False

    def paused(self) -> bool:
        return self._paused

    def swap_segmenter(self, new: Any, timeout: float = 30.0) -> Any:
        old, self.segmenter = self.segmenter, new
        return old

    def stop(self, timeout: float = 5.0) -> None:
        pass

    def dropped(self) -> Dict[str, int]:
        return {"capture": 0, "postprocess": 0, "publish": self.counters.dropped_publish}

    def _state(self) -> Dict[str, Any]:
        dropped = self.dropped()
        return {"dropped": dropped, "paused": self._paused, "cameras": {"": {"dropped": dropped}},
                "mqtt": self.sink.stats(), "outbox": self.sink.outbox_stats()}

    def stats(self) -> Dict[str, Any]:
        return self.telemetry.stats()

    def interval_s(self) -> float:
        fps = self.agent.sim.costs.source_fps(self.agent.config.agent.device_id)
        return max(1.0 / fps if fps > 0 else 0.0, self.segmenter.model.cost_ms / 1e3)

    def step(self, now: float) -> None:
        """Run the frames due by ``now`` (the clock thread), then the telemetry schedule."""
        if self._paused:
            self._next = now
        else:
            interval = self.interval_s()
            n = 0
            while self._next <= now and n < MAX_FRAMES_PER_TICK:
                self._frame(interval)
                self._next += interval
                n += 1
            if self._next < now:
                self._next = now + interval
        self.telemetry.tick(now)

    def _frame(self, interval: float) -> None:
        self.seq += 1
        c = self.counters
        c.captured += 1
        cost = self.segmenter.model.cost_ms * (1.0 + self._rand.uniform(-1, 1) * self.agent.sim.costs.jitter)
        self.telemetry.inferred()
        c.processed += 1
        timings = {"capture": 0.2, "preprocess": 1.0, "queue": 0.0, "inference": cost, "postprocess": 0.5,
                   "encode": 0.1, "publish": 0.05}
        timings["end_to_end"] = sum(timings.values())
        frame = SimpleNamespace(seq=self.seq, timestamp=time.time(), width=640, height=480)
        masks = SimpleNamespace(fractions={"background": 1.0})
        messages, self._last_mask_seq = stages.encode(frame, masks, self.segmenter.model.file.sha256,
                                                      self.encode_options, self._last_mask_seq)
        _, failed = stages.publish(self.sink, messages)
        c.publish_failed += failed
        self.agent.sim.count_frame(len(messages) - failed)
        self.telemetry.frame_done(self.seq, timings)


class SimAgent(Agent):
    """An :class:`Agent` whose pipeline is a :class:`SimPipeline` (everything else is the agent's)."""

    def __init__(self, config: Config, sim: "FleetSim") -> None:
        self.sim = sim
        super().__init__(config, install_signals=False,
                         handlers={**HANDLERS, "benchmark": lambda ctx: SimBench(ctx, sim.bench_pool)})
        self.models = SimModels(config, self, sim)
        conn = self.comms._conn  # the agent's MqttConnection, before it starts: its I/O on the shared loop
        conn.__class__ = LoopConnection
        conn.net = sim.net

    def start_pipeline(self, segmenter: Any = None) -> None:
        self.error = None
        try:
            if segmenter is None:
                segmenter = self.models.load()
        except EdgeAgentError as exc:
            self.error = str(exc)
            self.publish_info()
            return
        self.pipeline = SimPipeline(self, segmenter)  # type: ignore[assignment]
        self.comms.set_info(self.info())

    def start(self) -> None:
        """Agent.run's start sequence, without its main loop (the simulator's clock drives us)."""
        self.models.open_store()
        self.start_handlers()
        loop_outboxes(self.handlers.values(), self.sim.net)
        self.comms.start()
        self.start_pipeline()

    def stop(self) -> None:
        """Agent.run's stop sequence: final answers, retained info "stopped", then offline."""
        self._stop_handlers("agent stopping")
        self.stop_pipeline()
        self._stopped = True
        self.publish_info()
        self.comms.stop()


# --------------------------------------------------------------------------- the fleet


class FleetSim:
    """``n`` simulated devices ``<name_prefix>-0000``.. on one broker, in this process."""

    def __init__(self, n: int, workdir: Path, host: str = "127.0.0.1", port: int = 1883,
                 costs: Optional[Costs] = None, name_prefix: str = "sim",
                 tags: Callable[[int], Sequence[str]] = lambda i: (), overrides: Sequence[str] = (),
                 base_model: Optional[Path] = None) -> None:
        threading.stack_size(THREAD_STACK)  # ~6 threads per device: keep their address space small
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.costs = costs or Costs()
        self.labels = list(VOC)
        labels_file = self.workdir / "labels.txt"
        labels_file.write_text("\n".join(self.labels) + "\n")
        if base_model is None:
            base_model = self.workdir / "sim-base.tflite"
            base_model.write_bytes(fake_model_bytes("sim-base"))
        self.base_model = base_model
        self.net = NetLoop()
        self.bench_pool = ThreadPoolExecutor(BENCH_WORKERS, thread_name_prefix="fleet-sim-bench")
        base = load_config(None, [
            f"mqtt.host={host}", f"mqtt.port={port}", "mqtt.reconnect_min_s=0.5", "mqtt.reconnect_max_s=10",
            f"model.path={base_model}", f"model.labels={labels_file}", "source.kind=synthetic",
            "publish.timings_interval_s=5", "publish.stats_interval_s=10",
            "outbox.enabled=false",  # a SQLite file and a replay thread per device: bench/outbox.py's subject
            *overrides], env={})
        self.devices: List[SimAgent] = []
        for i in range(n):
            device = f"{name_prefix}-{i:04d}"
            cfg = dataclasses.replace(
                base, agent=dataclasses.replace(base.agent, device_id=device, state_dir=str(self.workdir / device),
                                                tags=tuple(tags(i))),
                mqtt=dataclasses.replace(base.mqtt, client_id=f"edge-agent-{device}"))
            self.devices.append(SimAgent(cfg, self))
        self._stop = threading.Event()
        self._clock: Optional[threading.Thread] = None
        self._count_lock = threading.Lock()
        self.frame_messages = 0  # result messages handed to the clients
        self.ticks = 0
        self.late_ticks = 0  # ticks that took longer than TICK_S (the machine is the limit)

    @property
    def ids(self) -> List[str]:
        return [d.config.agent.device_id for d in self.devices]

    def count_frame(self, messages: int) -> None:
        self.frame_messages += messages  # the clock thread only

    def start(self, workers: int = 16) -> "FleetSim":
        with ThreadPoolExecutor(workers) as pool:
            list(pool.map(lambda d: d.start(), self.devices))
        self._clock = threading.Thread(target=self._run_clock, name="fleet-sim-clock", daemon=True)
        self._clock.start()
        return self

    def connected(self) -> int:
        return sum(1 for d in self.devices if d.comms.connected)

    def wait_connected(self, timeout: float) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.connected() < len(self.devices):
            time.sleep(0.2)
        return self.connected()

    def _run_clock(self) -> None:
        while not self._stop.is_set():
            t0 = time.monotonic()
            for device in self.devices:
                pipeline = device.pipeline
                if pipeline is not None:
                    try:
                        pipeline.step(t0)
                    except Exception:  # one device's bug must not stop the fleet's clock
                        log.exception("%s: simulated frame failed", device.config.agent.device_id)
            self.ticks += 1
            spent = time.monotonic() - t0
            if spent > TICK_S:
                self.late_ticks += 1
            self._stop.wait(max(0.0, TICK_S - spent))

    def stop(self, workers: int = 16) -> None:
        self._stop.set()
        if self._clock is not None:
            self._clock.join(10)
        with ThreadPoolExecutor(workers) as pool:
            list(pool.map(lambda d: d.stop(), self.devices))
        self.bench_pool.shutdown(wait=False, cancel_futures=True)
        self.net.close()

    def mqtt_totals(self) -> Dict[str, int]:
        """Sum of every device's comms counters (published, dropped, ...)."""
        out: Dict[str, int] = {}
        for d in self.devices:
            for k, v in d.comms.stats().items():
                if isinstance(v, int) and not isinstance(v, bool):
                    out[k] = out.get(k, 0) + v
        return out

    def running(self) -> Dict[str, Optional[str]]:
        return {d.config.agent.device_id: d.models.running_sha() for d in self.devices}


def parse_costs(items: Iterable[str]) -> Dict[str, float]:
    out = {}
    for item in items:
        key, _, ms = item.partition("=")
        out[key.strip().lower()] = float(ms)
    return out


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--devices", type=int, default=100)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=1883)
    ap.add_argument("--prefix", default="sim", help="device ids <prefix>-0000...")
    ap.add_argument("--fps", type=float, default=1.0, help="every device's source frame rate (0: model-bound)")
    ap.add_argument("--cost", action="append", default=[], metavar="SHA256=MS",
                    help="fake inference ms of a model (sha256 or a prefix of >= 8 hex digits)")
    ap.add_argument("--default-cost", type=float, default=DEFAULT_COST_MS)
    ap.add_argument("--workdir", type=Path, default=Path("fleet-sim"))
    ap.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                    help="a config override for every device")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    costs = Costs(parse_costs(args.cost), args.default_cost, args.fps)
    sim = FleetSim(args.devices, args.workdir, args.host, args.port, costs, args.prefix, overrides=args.set)
    t0 = time.monotonic()
    sim.start()
    n = sim.wait_connected(120)
    print(f"{n}/{args.devices} devices connected in {time.monotonic() - t0:.1f} s; Ctrl-C stops them", flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        while not stop.wait(1.0):
            pass
    except KeyboardInterrupt:
        pass
    sim.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
