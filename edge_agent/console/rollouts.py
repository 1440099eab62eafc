"""The console's staged rollouts: start, list, show and cancel them from the page.

The rollout itself is :mod:`edge_agent.fleet.rollout` (stages, soak, gates, rollback, its JSON
state file), run in the console process on a connection of its own; this module only holds the
one running rollout, its model file, and reads the state files back for the page.

Routes (JSON)::

    GET  /api/rollouts              the newest rollouts (running and finished), from their state files
    GET  /api/rollouts/{id}         one: stages, each device's gate results (which gate, by how much),
                                    the rollback outcomes, the report and the progress lines
    POST /api/rollouts?devices=a,b|group=TAG|all=1&name=N[&stages=..&soak_s=..&baseline_s=..
                      &fps_ratio=..&p50_ratio=..&timeout_s=..]   the model file as the raw body -> 202
    POST /api/rollouts/{id}/cancel  the rollout's own cancel: it stops and rolls back what it changed

Bounds: one running rollout at a time (409 for another), its devices held like a deployment's
(409 while one of them has a deployment running, and no deployment for them while it runs), the
model capped like an upload (``--max-upload-mb``, 413). State files live in ``<state dir>/rollouts``
as ``<id>.json`` next to the model ``<id>.tflite`` (kept while the rollout may be resumed:
``edge-agent remote rollout --resume --state <id>.json``).
"""

from __future__ import annotations

import calendar
import collections
import contextlib
import json
import logging
import os
import re
import secrets
import threading
import time
from pathlib import Path
from typing import Any, Callable, Deque, Dict, List, Optional

from edge_agent.console.jobs import Jobs
from edge_agent.errors import EdgeAgentError
from edge_agent.fleet.client import FleetClient, select_group
from edge_agent.fleet.deploy import deploy_params
from edge_agent.fleet.rollout import Gates, Rollout, RolloutState, parse_stages

log = logging.getLogger(__name__)

ID_PATTERN = re.compile(r"^rollout-\d{8}-\d{6}-[0-9a-f]{6}$")
KEEP_LISTED = 50  # rollouts listed (the newest)
MAX_STATE_BYTES = 16 * 1024 * 1024  # a state file bigger than this is not read (1,000 devices: ~1 MB)
LOG_LINES = 200  # progress lines kept per rollout (the running one, the last KEEP_LISTED ended here)


class RolloutBusy(EdgeAgentError):
    """Another rollout is running (answered 409)."""

    status = 409


class _Live:
    """The running rollout: its devices, progress lines, and the Rollout once its thread built it."""

    def __init__(self, rollout_id: str, devices: List[str]) -> None:
        self.id, self.devices = rollout_id, devices
        self.rollout: Optional[Rollout] = None
        self.cancelling = False
        self.lines: Deque[str] = collections.deque(maxlen=LOG_LINES)


def outcome(status: str, rolled_back: Dict[str, str]) -> str:
    """The badge: running, interrupted, done, cancelled, rolled back (a gate failed, every device
    went back) or failed (a gate failed and a rollback did not complete, or the rollout broke)."""
    if status == "failed":
        return "rolled back" if rolled_back and all(v == "done" for v in rolled_back.values()) else "failed"
    return status


class Rollouts:
    """Starts, cancels and lists the console's rollouts (state files in ``directory``)."""

    def __init__(self, mqtt: Any, directory: Path, jobs: Jobs, on_change: Callable[[str], None] = lambda i: None,
                 discover_s: float = 1.0, sign_key: Any = None) -> None:
        self.mqtt, self.dir, self.jobs, self.on_change = mqtt, Path(directory), jobs, on_change
        self.discover_s, self.sign_key = discover_s, sign_key
        self._lock = threading.Lock()
        self._live: Optional[_Live] = None
        self._errors: Dict[str, str] = {}  # rollout id -> why its thread stopped (this process)
        self._ended: "collections.OrderedDict[str, List[str]]" = collections.OrderedDict()  # their lines
        self._cache: "collections.OrderedDict[str, Any]" = collections.OrderedDict()  # file -> (stat, doc)

    # -- files -----------------------------------------------------------------------------------
    def state_path(self, rollout_id: str) -> Path:
        if not ID_PATTERN.match(rollout_id):
            raise EdgeAgentError(f"unknown rollout {rollout_id[:80]}")
        return self.dir / f"{rollout_id}.json"

    def model_path(self, rollout_id: str) -> Path:
        return self.state_path(rollout_id).with_suffix(".tflite")

    def _read(self, path: Path) -> Optional[Dict[str, Any]]:
        """The state file's document (parsed again only when the file changed), None if unusable."""
        try:
            st = path.stat()
            key = (st.st_ino, st.st_mtime_ns, st.st_size)
            cached = self._cache.get(path.name)
            if cached is not None and cached[0] == key:
                return cached[1]
            doc = json.loads(path.read_text(encoding="utf-8")) if st.st_size <= MAX_STATE_BYTES else None
        except (OSError, ValueError):
            return None
        stages = doc.get("stages") if isinstance(doc, dict) else None
        if not isinstance(stages, list) or not all(isinstance(s, dict) and isinstance(s.get("devices"), list)
                                                   for s in stages):
            doc = None
        with self._lock:
            self._cache[path.name] = (key, doc)
            while len(self._cache) > 2 * KEEP_LISTED:
                self._cache.popitem(last=False)
        return doc

    def running_id(self) -> Optional[str]:
        with self._lock:
            return self._live.id if self._live else None

    # -- what the page reads ---------------------------------------------------------------------
    def doc(self, rollout_id: str) -> Optional[Dict[str, Any]]:
        """One rollout as the page shows it (its state file, plus what this process knows)."""
        path = self.state_path(rollout_id)
        raw = self._read(path)
        if raw is None:
            return None
        with self._lock:
            live = self._live if self._live and self._live.id == rollout_id else None
            lines = list(live.lines) if live else list(self._ended.get(rollout_id, []))
            cancelling = bool(live and live.cancelling)
        status = str(raw.get("status"))
        if status == "running" and live is None:
            status = "interrupted"  # no thread of this console runs it: the console stopped, or it broke
        rolled_back = raw.get("rolled_back") or {}
        stages = raw["stages"]
        if status == "cancelled":  # the stage it stopped in says so (the state file keeps where it was)
            stages = [dict(s, status="cancelled") if s.get("status") in ("deploying", "soaking") else s for s in stages]
        doc = {"id": rollout_id, "status": status, "outcome": outcome(status, rolled_back),
               "cancelling": cancelling, "model": raw.get("model") or {}, "devices": raw.get("devices") or [],
               "stages": stages, "gates": raw.get("gates") or {}, "soak_s": raw.get("soak_s"),
               "report": raw.get("report") or [], "rolled_back": rolled_back,
               "started_at": _started_at(rollout_id), "updated_at": raw.get("updated_at"),
               "lines": lines, "error": self._errors.get(rollout_id)}
        if status == "interrupted":
            doc["resume"] = f"edge-agent remote rollout --resume --state {path}"
        doc["model"] = {k: v for k, v in doc["model"].items() if k in ("name", "sha256", "size")}
        return doc

    def docs(self) -> List[Dict[str, Any]]:
        """The newest rollouts, newest first: a summary each (the page asks for one's details)."""
        try:
            paths = sorted(self.dir.glob("rollout-*.json"), reverse=True)[:KEEP_LISTED]
        except OSError:
            return []
        out = []
        for path in paths:
            doc = self.doc(path.stem) if ID_PATTERN.match(path.stem) else None
            if doc is None:
                continue
            failed = [line for line in doc["report"] if " failed " in line]
            summary = {k: doc[k] for k in ("id", "status", "outcome", "cancelling", "model", "started_at",
                                           "updated_at", "error")}
            summary.update(devices=len(doc["devices"]), stages=[s.get("status") for s in doc["stages"]],
                           first_failure=failed[0] if failed else None)
            out.append(summary)
        return out

    # -- starting and cancelling -----------------------------------------------------------------
    def begin(self, devices: List[str], stages: str) -> str:
        """Claim the one running slot and ``devices`` (RolloutBusy / DeviceBusy: 409) for a new
        rollout; RolloutError (400) for stages that do not fit. Then :meth:`start` or :meth:`abandon`."""
        parse_stages(stages, len(devices))
        rollout_id = time.strftime("rollout-%Y%m%d-%H%M%S-", time.gmtime()) + secrets.token_hex(3)
        with self._lock:
            if self._live is not None:
                raise RolloutBusy(f"rollout {self._live.id} is running: one at a time (cancel it or let it end)")
            self.jobs.reserve(devices, rollout_id)
            self._live = _Live(rollout_id, list(devices))
        return rollout_id

    def abandon(self, rollout_id: str) -> None:
        """The rollout of :meth:`begin` does not start (its upload failed): free its slot and devices."""
        with self._lock:
            live = self._live if self._live and self._live.id == rollout_id else None
            if live is not None:
                self._live = None
        if live is not None:
            self.jobs.release(live.devices)

    def start(self, rollout_id: str, name: str, gates: Gates, stages: str, soak_s: float, baseline_s: float,
              timeout_s: float) -> Dict[str, Any]:
        """Plan the rollout of the model at :meth:`model_path`, write its state file, run it in a thread."""
        with self._lock:
            live = self._live
        assert live is not None and live.id == rollout_id
        model = self.model_path(rollout_id)
        data = model.read_bytes()
        params = deploy_params(data, name, sign_key=self.sign_key)
        state = Rollout.plan(live.devices, stages, params, gates, soak_s)
        state.model["file"], state.model["chunk_size"] = str(model), params["chunk_size"]
        path = self.state_path(rollout_id)
        state.save(path)
        threading.Thread(target=self._run, args=(live, state, path, params, data, baseline_s, timeout_s),
                         name=f"console-{rollout_id}", daemon=True).start()
        self.on_change(rollout_id)
        return self.doc(rollout_id) or {}

    def cancel(self, rollout_id: str) -> Dict[str, Any]:
        self.state_path(rollout_id)  # a well-formed id
        with self._lock:
            live = self._live if self._live and self._live.id == rollout_id else None
            if live is None:
                raise RolloutBusy(f"rollout {rollout_id} is not running here: nothing to cancel")
            live.cancelling = True
            if live.rollout is not None:
                live.rollout.cancel()
            live.lines.append("cancel asked: stopping at the next step (a deployment under way is waited for), "
                              "then rolling back")
        self.on_change(rollout_id)
        return self.doc(rollout_id) or {}

    def _run(self, live: _Live, state: RolloutState, path: Path, params: Dict[str, Any], data: bytes,
             baseline_s: float, timeout_s: float) -> None:
        def out(line: str) -> None:
            with self._lock:
                live.lines.append(line)
            self.on_change(live.id)
        try:
            with FleetClient(self.mqtt) as client:
                client.discover(self.discover_s)
                rollout = Rollout(client, state, path, params, data, baseline_s=baseline_s,
                                  deploy_timeout_s=timeout_s, out=out)
                with self._lock:
                    live.rollout = rollout
                    if live.cancelling:
                        rollout.cancel()
                rollout.run()
        except EdgeAgentError as exc:
            self._errors[live.id] = str(exc)
        except Exception as exc:  # the console keeps serving; the page shows why
            log.exception("console %s failed", live.id)
            self._errors[live.id] = f"{type(exc).__name__}: {exc}"
        finally:
            if state.status != "running":  # finished: nothing will resume it
                with contextlib.suppress(OSError):
                    os.unlink(self.model_path(live.id))
            with self._lock:
                if self._live is live:
                    self._live = None
                self._ended[live.id] = list(live.lines)
                while len(self._ended) > KEEP_LISTED:
                    self._ended.popitem(last=False)
            self.jobs.release(live.devices)
            self.on_change(live.id)


def _started_at(rollout_id: str) -> Optional[float]:
    try:
        return float(calendar.timegm(time.strptime(rollout_id[8:23], "%Y%m%d-%H%M%S")))
    except ValueError:
        return None


# -- HTTP ------------------------------------------------------------------------------------------

def _number(query: Any, key: str, default: float, lo: float, hi: float) -> float:
    text = query.get(key)
    if text is None or text == "":
        return default
    try:
        value = float(text)
    except ValueError:
        value = None
    if value is None or not lo <= value <= hi:
        raise EdgeAgentError(f"{key}: expected a number {lo:g}..{hi:g}, got {text[:40]!r}")
    return value


def routes(rollouts: Rollouts, state: Any, settings: Any, guard: Callable[..., Any]) -> List[Any]:
    """The rollout routes of :func:`edge_agent.console.app.create_app` (its ``guard``: access rules)."""
    from starlette.requests import Request
    from starlette.responses import JSONResponse, Response
    from starlette.routing import Route

    from edge_agent.console.app import RequestProblem, _check_upload_size, _devices, _save_upload, _str

    @guard()
    async def listing(request: Request) -> Response:
        return JSONResponse({"rollouts": rollouts.docs(), "running": rollouts.running_id(),
                             "read_only": settings.read_only})

    @guard()
    async def one(request: Request) -> Response:
        doc = rollouts.doc(request.path_params["rollout"])
        if doc is None:
            return JSONResponse({"error": f"unknown rollout {request.path_params['rollout'][:80]}"}, status_code=404)
        return JSONResponse(doc)

    def targets(q: Any) -> List[str]:
        chosen = [k for k in ("devices", "group", "all") if q.get(k)]
        if len(chosen) != 1:
            raise RequestProblem("say which devices: devices=a,b, group=TAG or all=1 (one of them)")
        if chosen == ["devices"]:
            return sorted(set(_devices(q["devices"], state.device_ids())))
        known = state.client.devices()
        if chosen == ["group"]:
            return select_group(known, _str(dict(q), "group") or "")
        online = sorted(d.id for d in known.values() if d.online)
        if not online:
            raise RequestProblem("no device online to roll out to")
        return online

    @guard(write=True, command=True)
    async def start(request: Request) -> Response:
        q = request.query_params
        devices = targets(q)
        name = _str(dict(q), "name")
        if not name:
            raise RequestProblem("name: give the model a name")
        stages = (q.get("stages") or "1,50%,100%").strip()
        if len(stages) > 200:
            raise RequestProblem("stages: at most 200 characters")
        ratio = {k: _number(q, k, d, 0, 100) for k, d in (("fps_ratio", 0.8), ("p50_ratio", 1.2))}
        gates = Gates(fps_ratio=ratio["fps_ratio"] or None, p50_ratio=ratio["p50_ratio"] or None)  # 0: not checked
        soak_s = _number(q, "soak_s", 60.0, 0, 7 * 86400)
        baseline_s = _number(q, "baseline_s", 15.0, 1, 3600)
        timeout_s = _number(q, "timeout_s", 300.0, 5, 86400)
        _check_upload_size(request, settings)
        rollout_id = rollouts.begin(devices, stages)  # 409: another rollout, or a device busy; 400: stages
        model = rollouts.model_path(rollout_id)
        handed = False
        try:
            rollouts.dir.mkdir(parents=True, exist_ok=True)
            with open(model, "wb") as out:
                if not await _save_upload(request, out, settings):
                    return Response(status_code=400)
            doc = rollouts.start(rollout_id, name, gates, stages, soak_s, baseline_s, timeout_s)
            handed = True
            return JSONResponse(doc, status_code=202)
        except OSError as exc:
            raise EdgeAgentError(f"--state-dir {rollouts.dir}: cannot write the rollout ({exc.strerror})") from None
        finally:
            if not handed:
                with contextlib.suppress(OSError):
                    model.unlink()
                rollouts.abandon(rollout_id)

    @guard(write=True, command=True)
    async def cancel(request: Request) -> Response:
        return JSONResponse(rollouts.cancel(request.path_params["rollout"]), status_code=202)

    return [Route("/api/rollouts", listing), Route("/api/rollouts", start, methods=["POST"]),
            Route("/api/rollouts/{rollout}", one),
            Route("/api/rollouts/{rollout}/cancel", cancel, methods=["POST"])]
