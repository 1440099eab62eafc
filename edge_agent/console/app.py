"""The console's web app (Starlette): the page, the JSON API, Server-Sent Events, and who may do what.

Routes (JSON unless said otherwise)::

    GET  /                         the page (static/index.html; plain HTML/JS/CSS, no build step)
    GET  /api/devices              the fleet: one row per device (FleetState.row)
    GET  /api/devices/{id}         one row
    GET  /api/devices/{id}/mask.png | overlay.jpg   ?seq=N[&camera=C]: that frame's image as the device
                                   sent it (404 once it is gone); without seq the newest shown
    GET  /api/devices/{id}/history   ?camera=C: the device page's charts and event timeline
    GET  /api/events               SSE: hello, broker, device, forget, frame and job events (newest wins
                                   per client); at most Settings.max_event_streams at once, else 503
    GET  /api/jobs[/{id}]          benchmark/models/deploy/rollback jobs; /{id}/report.json = --json
    POST /api/bench | /api/models | /api/rollback    JSON body -> a job
    POST /api/deploy?devices=a,b&name=N[&labels=...]  the model file as the raw body -> a job; streamed
                                   to a temporary file, 413 beyond Settings.max_upload_mb, 409 while one
                                   of the devices has an upload/deployment/rollback running
    POST /api/session              token header -> a cookie for the page's GETs (EventSource, images)

Security (docs in README "Console"): broker credentials never leave the server.  Every POST needs
the ``X-Console-Token`` header: a custom header is never sent cross-site without a CORS preflight
(which we never grant), so a cookie alone cannot change anything (CSRF).  With a configured token
every API read needs it too (header or the session cookie).  Without one (loopback only, enforced
by :func:`edge_agent.console.server.check_listen`) the page gets a per-process token embedded, and
the Host header must name a loopback address (DNS rebinding).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import os
import secrets
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator, Dict, List, Optional, Set, Tuple

from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from edge_agent.console.jobs import Jobs
from edge_agent.console.rollouts import routes as rollout_routes
from edge_agent.console.settings import Settings
from edge_agent.console.state import FleetState
from edge_agent.errors import EdgeAgentError
from edge_agent.inference.labels import parse_labels

log = logging.getLogger(__name__)

STATIC = Path(__file__).parent / "static"
TOKEN_HEADER = "x-console-token"
COOKIE = "edge_agent_console"
KEEPALIVE_S = 15.0
BROKER_POLL_S = 0.5
LOOPBACK_HOSTS = {"localhost", "127.0.0.1", "::1", "[::1]"}


class RequestProblem(EdgeAgentError):
    """A bad request from the page or a script: answered ``status`` (400) with one line."""

    def __init__(self, text: str, status: int = 400) -> None:
        super().__init__(text)
        self.status = status


# -- live events -----------------------------------------------------------------------------------

@dataclass(eq=False)
class _Listener:
    event: asyncio.Event = field(default_factory=asyncio.Event)
    dirty: Set[Tuple[str, str]] = field(default_factory=set)


class Hub:
    """Fans changes out to the SSE clients; ``notify`` may be called from any thread."""

    def __init__(self) -> None:
        self.loop: Optional[asyncio.AbstractEventLoop] = None
        self.listeners: Set[_Listener] = set()
        self.streams = 0  # open /api/events responses (counted from the request, on the loop)
        self.closing = False

    def close(self) -> None:
        """End every event stream (shutting down: the server would otherwise wait for them)."""
        def wake() -> None:
            self.closing = True
            for listener in self.listeners:
                listener.event.set()
        if self.loop is not None and not self.loop.is_closed():
            self.loop.call_soon_threadsafe(wake)

    def notify(self, kind: str, key: str) -> None:
        loop = self.loop
        if loop is not None and not loop.is_closed():
            try:
                loop.call_soon_threadsafe(self._mark, kind, key)
            except RuntimeError:  # the loop closed meanwhile (shutting down)
                pass

    def _mark(self, kind: str, key: str) -> None:
        for listener in self.listeners:
            listener.dirty.add((kind, key))
            listener.event.set()


# -- access ----------------------------------------------------------------------------------------

@dataclass
class Access:
    token: str  # configured, or generated per process (then embedded in the page)
    configured: bool
    loopback_only: bool

    @classmethod
    def make(cls, token: Optional[str], loopback: bool) -> "Access":
        return cls(token or secrets.token_urlsafe(24), bool(token), loopback and not token)

    def _match(self, value: Optional[str]) -> bool:
        return bool(value) and hmac.compare_digest(value.encode(), self.token.encode())

    def refusal(self, request: Request, write: bool) -> Optional[Response]:
        """None when the request may proceed, else the answer (403/401) saying why in one line."""
        if self.loopback_only:
            if _host_name(request.headers.get("host") or "") not in LOOPBACK_HOSTS:
                return _error(403, f"Host {request.headers.get('host')!r} refused: this console serves loopback only")
        origin = request.headers.get("origin")
        if write and origin and origin.split("://", 1)[-1] != request.headers.get("host"):
            return _error(403, f"cross-origin request from {origin} refused")
        if write:
            if not self._match(request.headers.get(TOKEN_HEADER)):
                return _error(403, "missing or wrong X-Console-Token header")
        elif self.configured and not (self._match(request.headers.get(TOKEN_HEADER))
                                      or self._match(request.cookies.get(COOKIE))):
            return _error(401, "token required (X-Console-Token header or a session from the page)")
        return None


def _host_name(host: str) -> str:
    """``[::1]:8080`` -> ``[::1]``, ``localhost:8080`` -> ``localhost`` (lower case)."""
    host = host.lower()
    if host.startswith("["):
        return host.split("]", 1)[0] + "]"
    return host.rsplit(":", 1)[0] if ":" in host else host


def _error(status: int, text: str) -> JSONResponse:
    return JSONResponse({"error": text}, status_code=status)


# -- request parsing (one line per problem) --------------------------------------------------------

def _devices(value: Any, known: List[str]) -> List[str]:
    if isinstance(value, str):
        value = [v for v in value.split(",") if v]
    if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
        raise RequestProblem("devices: expected a non-empty list of device ids")
    unknown = [v for v in value if v not in known]
    if unknown:
        raise RequestProblem(f"devices: unknown device(s) {', '.join(unknown)}")
    return value


def _int(doc: Dict[str, Any], key: str, default: Optional[int], lo: int, hi: int) -> Optional[int]:
    value = doc.get(key, default)
    if value is None or value == "":
        return default
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise RequestProblem(f"{key}: expected an integer {lo}..{hi}, got {value!r}")
    return value


def _bool(doc: Dict[str, Any], key: str) -> bool:
    value = doc.get(key, False)
    if not isinstance(value, bool):
        raise RequestProblem(f"{key}: expected true or false, got {value!r}")
    return value


def _str(doc: Dict[str, Any], key: str) -> Optional[str]:
    value = doc.get(key)
    if value is None or value == "":
        return None
    if not isinstance(value, str) or len(value) > 128:
        raise RequestProblem(f"{key}: expected a name (at most 128 characters)")
    return value


async def _json_body(request: Request) -> Dict[str, Any]:
    try:
        doc = json.loads(await request.body() or b"{}")
    except ValueError:
        raise RequestProblem("the body is not JSON") from None
    if not isinstance(doc, dict):
        raise RequestProblem("the body must be a JSON object")
    return doc


def _too_large(settings: Settings) -> RequestProblem:
    return RequestProblem(f"the model is larger than --max-upload-mb {settings.max_upload_mb:g}", 413)


def _check_upload_size(request: Request, settings: Settings) -> None:
    """413 before anything is reserved when Content-Length already says the model is too large."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > settings.max_upload_bytes:
        raise _too_large(settings)


async def _save_upload(request: Request, out: Any, settings: Settings) -> bool:
    """Stream the body into ``out``: 413 beyond --max-upload-mb, 400 if empty; False if the client left."""
    size = 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > settings.max_upload_bytes:
                raise _too_large(settings)
            out.write(chunk)
    except ClientDisconnect:
        return False
    if size == 0:
        raise RequestProblem("the body is empty: send the model file")
    return True


# -- the app ---------------------------------------------------------------------------------------

class _EventStream(StreamingResponse):
    """An SSE response that gives its slot back however it ends (also if never started)."""

    def __init__(self, content: Any, hub: Hub, **kwargs: Any) -> None:
        super().__init__(content, **kwargs)
        self.hub = hub

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.hub.streams -= 1


def create_app(state: FleetState, jobs: Jobs, hub: Hub, access: Access, settings: Settings = Settings(),
               title: str = "edge-agent console", rollouts: Any = None) -> Starlette:
    """``rollouts``: a :class:`edge_agent.console.rollouts.Rollouts` (its /api/rollouts routes)."""
    page = (STATIC / "index.html").read_text(encoding="utf-8")

    def guard(write: bool = False, command: bool = False):
        """``write``: changes state (token checked); ``command``: sends commands to devices
        (refused by a read-only console)."""
        def wrap(handler):
            async def endpoint(request: Request) -> Response:
                refused = access.refusal(request, write)
                if refused is not None:
                    return refused
                if command and settings.read_only:
                    return _error(403, "read-only console (started with --read-only, for viewer credentials): "
                                       "commands are refused")
                try:
                    return await handler(request)
                except EdgeAgentError as exc:  # RequestProblem (400, 413), DeviceBusy (409), ...
                    return _error(getattr(exc, "status", 400), str(exc))
            return endpoint
        return wrap

    async def index(request: Request) -> Response:
        refused = access.refusal(request, False) if access.loopback_only else None
        if refused is not None:
            return refused
        embedded = "" if access.configured else access.token
        html = (page.replace("{{TOKEN}}", embedded).replace("{{TITLE}}", title)
                .replace("{{READ_ONLY}}", "true" if settings.read_only else "false"))
        return HTMLResponse(html, headers={"Cache-Control": "no-store",
                                           "Content-Security-Policy": "default-src 'self'; img-src 'self' blob: data:; "
                                                                      "style-src 'self'; frame-ancestors 'none'",
                                           "X-Content-Type-Options": "nosniff"})

    @guard()
    async def devices(request: Request) -> Response:
        return JSONResponse({"prefix": state.client.prefix, "broker": _broker(), "devices": state.rows()})

    @guard()
    async def device(request: Request) -> Response:
        dev = request.path_params["device"]
        if dev not in state.device_ids():
            return _error(404, f"unknown device {dev}")
        return JSONResponse(state.row(dev))

    def image(what: str, media: str):
        @guard()
        async def endpoint(request: Request) -> Response:
            seq = request.query_params.get("seq")
            if seq is not None and not seq.isdigit():
                raise RequestProblem("seq: expected a frame number")
            data, n = state.image(request.path_params["device"], what, None if seq is None else int(seq),
                                  request.query_params.get("camera", ""))
            if data is None:
                return _error(404, f"no {what} of that frame here" if seq else f"no {what} received yet")
            return Response(data, media_type=media, headers={"Cache-Control": "no-store", "X-Frame-N": str(n)})
        return endpoint

    @guard()
    async def history(request: Request) -> Response:
        dev = request.path_params["device"]
        if dev not in state.device_ids():
            return _error(404, f"unknown device {dev}")
        return JSONResponse(state.history(dev, request.query_params.get("camera", "")))

    async def favicon(request: Request) -> Response:
        return Response((STATIC / "favicon.svg").read_bytes(), media_type="image/svg+xml",
                        headers={"Cache-Control": "max-age=86400"})

    @guard()
    async def events(request: Request) -> Response:
        if hub.streams >= settings.max_event_streams:
            return _error(503, f"too many event streams open ({settings.max_event_streams}, "
                               "--max-event-streams): close a console page")
        hub.streams += 1

        async def stream() -> AsyncIterator[str]:
            listener = _Listener()
            hub.listeners.add(listener)
            try:
                hello = {"prefix": state.client.prefix, "broker": _broker(), "devices": state.rows(),
                         "jobs": jobs.docs()}
                yield f"event: hello\ndata: {json.dumps(hello)}\n\n"
                while True:
                    try:
                        await asyncio.wait_for(listener.event.wait(), KEEPALIVE_S)
                    except asyncio.TimeoutError:
                        yield ": keepalive\n\n"
                        continue
                    if hub.closing:
                        return
                    listener.event.clear()
                    dirty, listener.dirty = listener.dirty, set()
                    for kind, key in sorted(dirty):
                        data = _event_data(kind, key)
                        if data is not None:
                            yield f"event: {kind}\ndata: {json.dumps(data)}\n\n"
            finally:
                hub.listeners.discard(listener)
        return _EventStream(stream(), hub, media_type="text/event-stream",
                            headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"})

    def _broker() -> Dict[str, Any]:
        cfg = state.client.cfg
        return {"host": cfg.host, "port": cfg.port, "connected": state.client.connected}

    def _event_data(kind: str, key: str) -> Optional[Dict[str, Any]]:
        if kind == "broker":
            return _broker()
        if kind == "device":
            return state.row(key) if state.known(key) else None
        if kind == "forget":
            return None if state.known(key) else {"device": key}
        if kind == "frame":
            return state.frame(key)
        job = jobs.get(key)
        return job.doc() if job is not None else None

    @guard()
    async def job_list(request: Request) -> Response:
        return JSONResponse({"jobs": jobs.docs()})

    def _job(request: Request):
        job = jobs.get(request.path_params["job"])
        if job is None:
            raise RequestProblem(f"unknown job {request.path_params['job']}")
        return job

    @guard()
    async def job_doc(request: Request) -> Response:
        return JSONResponse(_job(request).doc())

    @guard()
    async def job_report(request: Request) -> Response:
        job = _job(request)
        if job.report is None:
            return _error(404, f"{job.id} has no benchmark report (yet)")
        return JSONResponse(job.report, headers={"Content-Disposition": f'attachment; filename="{job.id}.json"'})

    @guard(write=True, command=True)
    async def bench(request: Request) -> Response:
        doc = await _json_body(request)
        job = jobs.bench(_devices(doc.get("devices"), state.device_ids()), runs=_int(doc, "runs", 50, 1, 100000),
                         warmup=_int(doc, "warmup", 1, 0, 100), pipeline=_bool(doc, "pipeline"),
                         pause=_bool(doc, "pause"), model=_str(doc, "model"))
        return JSONResponse(job.doc(), status_code=202)

    @guard(write=True, command=True)
    async def models(request: Request) -> Response:
        doc = await _json_body(request)
        return JSONResponse(jobs.models(_devices(doc.get("devices"), state.device_ids())).doc(), status_code=202)

    @guard(write=True, command=True)
    async def rollback(request: Request) -> Response:
        doc = await _json_body(request)
        job = jobs.rollback(_devices(doc.get("devices"), state.device_ids()), to=_str(doc, "to"))
        return JSONResponse(job.doc(), status_code=202)

    @guard(write=True, command=True)
    async def deploy(request: Request) -> Response:
        q = request.query_params
        targets = _devices(q.get("devices", ""), state.device_ids())
        name = _str(dict(q), "name")
        if not name:
            raise RequestProblem("name: give the model a name")
        labels = parse_labels(q["labels"], "labels") if q.get("labels") else None
        confirm_frames = _int(dict(q), "confirm_frames", None, 0, 100000)
        _check_upload_size(request, settings)
        jobs.reserve(targets, "upload")  # DeviceBusy: 409
        path: Optional[str] = None
        handed = False
        try:
            fd, path = tempfile.mkstemp(prefix="edge-agent-console-", suffix=".tflite", dir=settings.upload_dir)
            with os.fdopen(fd, "wb") as out:
                if not await _save_upload(request, out, settings):
                    return Response(status_code=400)  # nobody is there to read it
            job = jobs.deploy(targets, Path(path), name, labels=labels, confirm_frames=confirm_frames,
                              reserved=True)
            handed = True  # the job removes the file and releases the devices when it ends
            return JSONResponse(job.doc(), status_code=202)
        finally:
            if not handed:
                if path is not None:
                    with contextlib.suppress(OSError):
                        os.unlink(path)
                jobs.release(targets)

    @guard(write=True)
    async def session(request: Request) -> Response:
        response = JSONResponse({"ok": True})
        response.set_cookie(COOKIE, access.token, httponly=True, samesite="strict",
                            secure=request.url.scheme == "https")
        return response

    async def watch_broker() -> None:
        """The broker link is no message: look at it every BROKER_POLL_S and tell the pages on change."""
        was = state.client.connected
        while True:
            await asyncio.sleep(BROKER_POLL_S)
            now = state.client.connected
            if now != was:
                was = now
                hub.notify("broker", "")

    async def forget_devices() -> None:
        """Devices offline (and silent) for --forget-after-h are dropped (FleetState.sweep)."""
        while True:
            await asyncio.sleep(settings.sweep_s)
            try:
                state.sweep()
            except Exception:  # never stop forgetting for one bad round
                log.exception("console: forgetting devices failed")

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        hub.loop = asyncio.get_running_loop()
        tasks = [asyncio.create_task(watch_broker()), asyncio.create_task(forget_devices())]
        yield
        for task in tasks:
            task.cancel()
        jobs.close()  # uploaded models of deployments still running
        hub.loop = None

    routes = [
        Route("/", index),
        Route("/favicon.ico", favicon),
        Route("/api/devices", devices),
        Route("/api/devices/{device}", device),
        Route("/api/devices/{device}/mask.png", image("mask", "image/png")),
        Route("/api/devices/{device}/overlay.jpg", image("overlay", "image/jpeg")),
        Route("/api/devices/{device}/history", history),
        Route("/api/events", events),
        Route("/api/jobs", job_list),
        Route("/api/jobs/{job}", job_doc),
        Route("/api/jobs/{job}/report.json", job_report),
        Route("/api/bench", bench, methods=["POST"]),
        Route("/api/models", models, methods=["POST"]),
        Route("/api/rollback", rollback, methods=["POST"]),
        Route("/api/deploy", deploy, methods=["POST"]),
        Route("/api/session", session, methods=["POST"]),
        *(rollout_routes(rollouts, state, settings, guard) if rollouts is not None else []),
        Mount("/static", StaticFiles(directory=str(STATIC)), name="static"),
    ]
    return Starlette(routes=routes, lifespan=lifespan)
