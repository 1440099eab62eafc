"""``cmd/benchmark``: benchmark a device over MQTT without touching the live pipeline.

:class:`RemoteBench` (in the handler table, :data:`edge_agent.remote.HANDLERS`) serves
``<prefix>/<device>/cmd/benchmark`` and ``<prefix>/all/cmd/benchmark``. A request (JSON, see :func:`request_schema`)::

    {"request_id": "r1", "runs": 50, "warmup": 1, "threads": 2, "model": null,
     "pipeline": false, "frame_size": "640x480", "pause": false}

is answered at once ``accepted`` (with its queue position) or ``rejected`` (with the reason),
then ``progress`` messages (at most every ``PROGRESS_INTERVAL_S``), then exactly one final
``done`` (``result``: the same document as ``edge-agent bench --json``) or ``failed`` (``reason``),
on ``<prefix>/<device>/benchmark/<request_id>`` (and the MQTT 5 response topic); see
:mod:`edge_agent.comms.commands` for the protocol.

Design choices:

* The running model is benchmarked on a SECOND interpreter loaded from the same file (same
  runtime, delegate and threads as configured unless ``threads`` says otherwise): the live
  interpreter is never invoked from another thread. ``model`` names another model from the
  device's model store (name or sha256) or from the manifest's fetched models
  (``catalog.resolve``'s one rule, through the model manager); paths are not accepted over the
  network.
* ``pause: true`` pauses the live pipeline (``Pipeline.pause``) for the benchmark and resumes it
  afterwards whatever happens, so the two do not share the CPU; without it, the numbers include
  the interference of the live pipeline (``live_pipeline`` in the result says which).
* Concurrency: ``benchmark.max_concurrent`` worker threads (default 1: two benchmarks on the
  same CPU measure each other). Up to ``QUEUE_LIMIT`` further requests wait in a FIFO queue
  (``accepted`` with ``queue_position`` > 0); beyond that a request is ``rejected`` with
  ``busy``.
* Limits from ``[benchmark]``: ``runs <= max_runs``; the benchmark stops after ``max_seconds``
  (``max_secs`` in the request may only lower it; ``stopped`` in the result says so) and never
  exceeds ``max_runs`` runs even with ``min_secs``.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from typing import Any, Deque, Dict, List, Optional, Tuple

from edge_agent.comms.commands import (BoolField, ChoiceField, CommandChannel, FloatField, IntField, Request,
                                       Schema, StrField)
from edge_agent.output import benchmark as bench
from edge_agent.system import release_memory
from edge_agent.errors import EdgeAgentError
from edge_agent.output.throttle import Throttle
from edge_agent.remote.context import HandlerContext, OneCommandHandler
from edge_agent.sources.images import MAX_IMAGE_PIXELS, MAX_IMAGE_TEXT

log = logging.getLogger(__name__)

COMMAND = "benchmark"
KIND = "benchmark"
QUEUE_LIMIT = 4
PROGRESS_INTERVAL_S = 0.5
PAUSE_TIMEOUT_S = 10.0
MAX_BYTES = 4096
MODEL_NAME_PATTERN = r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}"
DEFAULT_RUNS = 50


def _frame_size(text: str) -> Tuple[int, int]:
    """A frame size over the network: the local sides' range, and at most ``MAX_IMAGE_PIXELS``
    (an 8192x8192 request made a 200 MB frame, and as much again in every stage)."""
    w, h = bench.parse_frame_size(text)
    if w * h > MAX_IMAGE_PIXELS:
        raise ValueError(f"frame size {text!r}: more than {MAX_IMAGE_TEXT}")
    return w, h


def request_schema(limits: Any) -> Schema:
    """The ``cmd/benchmark`` fields; ``limits`` is the agent's ``[benchmark]`` config section."""
    max_runs, max_s = int(limits.max_runs), float(limits.max_seconds)
    return {
        "runs": IntField(1, max_runs, default=min(DEFAULT_RUNS, max_runs), doc="measured runs"),
        "warmup": IntField(0, min(100, max_runs), default=1, doc="warmup runs after the first inference"),
        "min_secs": FloatField(0.0, max_s, default=0.0, doc="run at least this long"),
        "max_secs": FloatField(0.1, max_s, default=max_s, doc="stop after this long"),
        "threads": IntField(1, 64, default=None, nullable=True, doc="interpreter threads (null: as configured)"),
        "model": StrField(MODEL_NAME_PATTERN, "a model name or sha256 from the device's store or manifest",
                          default=None, nullable=True, doc="null: the running model"),
        "pipeline": BoolField(default=False, doc="time every stage and end to end"),
        "frame_size": StrField(r"[0-9]{1,5}x[0-9]{1,5}",
                               f"WxH with sides {bench.FRAME_SIDE[0]}..{bench.FRAME_SIDE[1]}, at most "
                               f"{MAX_IMAGE_PIXELS} pixels (4096x4096)",
                               convert=_frame_size, default=None, nullable=True,
                               doc="frame size (default 640x480)"),
        "input": ChoiceField(("random", "pattern"), default="random", doc="input frames"),
        "pause": BoolField(default=False, doc="pause the live pipeline during the benchmark"),
        "samples": BoolField(default=True, doc="include every run's latency in the result"),
    }


# --------------------------------------------------------------------------- the service


class _Progress:
    """Progress answers of one request: a phase change or the last run always goes out, else at
    most one every ``PROGRESS_INTERVAL_S`` (the shared :class:`Throttle`)."""

    def __init__(self, request: Request, interval: float = PROGRESS_INTERVAL_S) -> None:
        self.request = request
        self.throttle = Throttle(interval)
        self.phase = ""

    def __call__(self, phase: str, done: int, total: int) -> None:
        if not self.throttle.ready(force=phase != self.phase or done == total):
            return
        self.phase = phase
        self.request.progress(phase=phase, done=done, total=total)


class RemoteBench(OneCommandHandler):
    """Queue, workers and pause bookkeeping for remote benchmarks on one agent."""

    command = COMMAND

    def __init__(self, ctx: HandlerContext) -> None:
        super().__init__(ctx)
        limits = ctx.config().benchmark
        self.limits = limits
        self.channel = CommandChannel(ctx.comms, KIND, request_schema(limits), MAX_BYTES)
        self._queue: Deque[Request] = collections.deque()
        self._cond = threading.Condition()
        self._running = 0
        self._workers: List[threading.Thread] = []
        self._pause_lock = threading.Lock()
        self._pausers = 0
        self._stopping: Optional[str] = None

    # -- receiving (paho's network thread: parse, decide, queue; never run anything here) ----
    def on_message(self, topic: str, payload: bytes, props: Dict[str, Any]) -> None:
        request = self.channel.receive(topic, payload, props)
        if request is None:
            return
        name = request.params.get("model")
        if name:
            try:
                request.params["_model"] = self.ctx.models.find(name)
            except EdgeAgentError as exc:
                request.reject(str(exc))
                return
        with self._cond:
            waiting = len(self._queue)
            slots = int(self.limits.max_concurrent)
            if self._stopping:
                busy = False
                request.reject(f"agent stopping: {self._stopping}")
            elif self._running + waiting >= slots + QUEUE_LIMIT:
                busy = True
            else:
                busy = False
                self._queue.append(request)
                position = max(0, self._running + waiting + 1 - slots)
                self._start_workers(slots)
                # Accept before a worker can send progress: still under the lock.
                request.accept(queue_position=position, params=_public(request.params))
                self._cond.notify()
        if busy:
            request.reject(f"busy: {self._running} running and {waiting} queued "
                           f"(max_concurrent {slots}, queue {QUEUE_LIMIT})")

    def _start_workers(self, slots: int) -> None:
        while len(self._workers) < slots:
            worker = threading.Thread(target=self._work, name=f"bench-worker-{len(self._workers)}", daemon=True)
            self._workers.append(worker)
            worker.start()

    # -- working --------------------------------------------------------------------------------
    def _work(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: bool(self._queue))
                request = self._queue.popleft()
                self._running += 1
            try:
                self.run(request)
            except EdgeAgentError as exc:
                request.fail(str(exc))
            except Exception as exc:  # a bug must fail one request, never the worker or the agent
                log.exception("benchmark %s crashed", request.id)
                request.fail(f"internal error: {type(exc).__name__}: {exc}")
            finally:
                if not request.finished:
                    request.fail("internal error: the benchmark ended without a result")
                release_memory()  # the second interpreter's heap, back to the system
                with self._cond:
                    self._running -= 1
                    self._cond.notify_all()

    def run(self, request: Request) -> None:
        """Load a second interpreter, optionally pause the live pipeline, benchmark, answer."""
        p = request.params
        models = self.ctx.models
        path, labels = p.get("_model") or models.running_model()  # raises the model's problem, if any
        settings = bench.BenchSettings(
            runs=p["runs"], warmup=p["warmup"], min_secs=p["min_secs"], max_secs=p["max_secs"],
            max_count=int(self.limits.max_runs), pipeline=p["pipeline"], frame_size=p["frame_size"],
            input=p["input"], samples=p["samples"],
        )
        progress = _Progress(request)
        progress("init", 0, 1)
        paused = self._pause() if p["pause"] else False
        try:
            t0 = time.perf_counter()
            segmenter = models.build(path, labels, **({"threads": p["threads"]} if p["threads"] else {}))
            init_ms = (time.perf_counter() - t0) * 1e3
            context = {"device_id": self.ctx.config().agent.device_id,
                       "live_pipeline": self._live_state(paused)}
            result = bench.run_benchmark(segmenter, settings, init_ms=init_ms, progress=progress, context=context,
                                         cancelled=lambda: self._stopping is not None)
            del segmenter  # release the second interpreter before answering
        finally:
            if paused:
                self._resume()
        if result["stopped"] == "cancelled":
            request.fail(f"cancelled: {self._stopping}", result=result)
        else:
            request.done(result=result)

    def _live_state(self, paused: bool) -> Dict[str, Any]:
        return {**self.ctx.pipeline.state(), "paused": paused}

    # -- pausing (reference counted: with max_concurrent > 1 the last one out resumes) ---------
    def _pause(self) -> bool:
        with self._pause_lock:
            self._pausers += 1
        idle = self.ctx.pipeline.pause(PAUSE_TIMEOUT_S)
        if idle is None:  # no live pipeline: nothing to pause
            with self._pause_lock:
                self._pausers -= 1
            return False
        if not idle:
            log.warning("the live pipeline did not become idle within %.0f s", PAUSE_TIMEOUT_S)
        return True

    def _resume(self) -> None:
        with self._pause_lock:
            self._pausers -= 1
            last = self._pausers == 0
        if last:
            self.ctx.pipeline.resume()

    def shutdown(self, reason: str = "agent stopping", timeout: float = 5.0) -> None:
        """Fail queued requests, cancel running ones (after their current run), refuse new ones.

        For the agent's stop path, BEFORE its comms stop, so every request still gets its one
        final answer; returns when the workers are idle and the answers are flushed (or timeout).
        """
        with self._cond:
            self._stopping = reason
            queued, self._queue = list(self._queue), collections.deque()
        for request in queued:
            request.fail(f"cancelled: {reason}")
        deadline = time.monotonic() + timeout
        with self._cond:
            self._cond.wait_for(lambda: self._running == 0, timeout)
        self.channel.outbox.flush(max(0.0, deadline - time.monotonic()))

    def stats(self) -> Dict[str, Any]:
        with self._cond:
            return {"running": self._running, "queued": len(self._queue), **self.channel.stats()}


def _public(params: Dict[str, Any]) -> Dict[str, Any]:
    """The effective parameters, as sent back in ``accepted`` (internal keys left out)."""
    out = {k: v for k, v in params.items() if not k.startswith("_")}
    if out.get("frame_size") is not None:
        out["frame_size"] = "%dx%d" % tuple(out["frame_size"])
    return out
