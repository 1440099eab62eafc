"""Fleet commands started from the console (benchmark, models, deploy, rollback), one thread each.

Every job opens its own :class:`FleetClient` connection and runs the very code of ``edge-agent
remote ...`` (:mod:`edge_agent.fleet.bench`, :mod:`edge_agent.fleet.deploy`), so the page shows the
same numbers and states as the CLI: the rows are ``summary_rows`` / ``deploy_rows`` /
``model_rows``, the cells :func:`edge_agent.fleet.table.cell`, and a benchmark keeps its
``report_doc`` (what ``remote bench --json`` writes).  ``on_change(job_id)`` runs on progress.

A device has at most one deployment or rollback at a time, its upload included: :meth:`Jobs.reserve`
claims the devices (:class:`DeviceBusy`, answered 409, when one is taken) and the job gives them
back when it ends.  A deployment reads the model from the uploaded file when it starts and removes
the file when it ends.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Set

from edge_agent.errors import EdgeAgentError
from edge_agent.fleet import bench as fleet_bench
from edge_agent.fleet import deploy as fleet_deploy
from edge_agent.fleet.client import FleetClient
from edge_agent.fleet.table import Column, cell

log = logging.getLogger(__name__)

KEEP_JOBS = 50  # finished jobs remembered (the newest)


class DeviceBusy(EdgeAgentError):
    """A device already has an upload, deployment or rollback running (answered 409)."""

    status = 409


def table(rows: List[Dict[str, Any]], columns: Sequence[Column]) -> Dict[str, Any]:
    """Titles and text cells exactly as ``format_table`` prints them, plus each row's status/reason."""
    pairs = [(c, c) if isinstance(c, str) else c for c in columns]
    return {"columns": [title for _, title in pairs],
            "cells": [[cell(r.get(key)) for key, _ in pairs] for r in rows],
            "status": [r.get("status") for r in rows], "reasons": [r.get("reason") for r in rows]}


class Job:
    def __init__(self, job_id: str, kind: str, devices: List[str], params: Dict[str, Any]) -> None:
        self.id, self.kind, self.devices, self.params = job_id, kind, devices, params
        self.status = "running"  # running | done | failed (the job; devices have their own)
        self.error: Optional[str] = None
        self.progress: Dict[str, Dict[str, Any]] = {d: {"status": "sent"} for d in devices}
        self.table: Optional[Dict[str, Any]] = None
        self.report: Optional[Dict[str, Any]] = None  # benchmark: the report_doc
        self.started_at = time.time()
        self.finished_at: Optional[float] = None
        self._lock = threading.Lock()  # progress is written on paho's thread, read on the web loop

    def set_progress(self, device: str, entry: Dict[str, Any]) -> None:
        with self._lock:
            self.progress[device] = entry

    def doc(self) -> Dict[str, Any]:
        samples = None
        if self.report is not None:
            samples = {dev: (e.get("result") or {}).get("samples_ms") or []
                       for dev, e in self.report["devices"].items()}
        with self._lock:
            progress = {dev: dict(entry) for dev, entry in self.progress.items()}
        return {"id": self.id, "kind": self.kind, "devices": self.devices, "params": self.params,
                "status": self.status, "outcome": outcome(self.status, progress, self.table),
                "error": self.error, "progress": progress, "table": self.table,
                "samples_ms": samples, "started_at": self.started_at, "finished_at": self.finished_at}


def outcome(status: str, progress: Dict[str, Dict[str, Any]], table: Optional[Dict[str, Any]] = None) -> str:
    """What a job's badge says: running, done (every device done), partly failed, or failed."""
    if status == "running":
        return "running"
    if status != "done":
        return "failed"
    finals = [p.get("status") for p in progress.values()]
    if table and table.get("status"):  # the rows' statuses (a benchmark's or a store listing's)
        finals = list(table["status"])
    done = sum(1 for s in finals if s == "done")
    if finals and done == len(finals):
        return "done"
    return "partly failed" if done else "failed"


def _progress_entry(doc: Dict[str, Any]) -> Dict[str, Any]:
    keep = ("status", "phase", "done", "total", "stage", "received", "reason", "state", "queue_position")
    return {k: doc[k] for k in keep if k in doc}


class Jobs:
    """Starts and remembers jobs; each runs ``remote``'s code on a connection of its own."""

    def __init__(self, mqtt: Any, on_change: Callable[[str], None], discover_s: float = 1.0,
                 sign_key: Any = None) -> None:
        self.mqtt, self.on_change, self.discover_s, self.sign_key = mqtt, on_change, discover_s, sign_key
        self._jobs: Dict[str, Job] = {}
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        self._busy: Dict[str, str] = {}  # device -> what holds it ("upload", a job id)
        self._files: Set[str] = set()  # uploaded models of running deployments

    def close(self) -> None:
        """Shutting down: remove the uploaded models of deployments still running."""
        with self._lock:
            files, self._files = list(self._files), set()
        for path in files:
            with contextlib.suppress(OSError):
                os.unlink(path)

    # -- one deployment per device -----------------------------------------------------------------
    def reserve(self, devices: Iterable[str], what: str) -> None:
        """Claim ``devices`` for ``what``, all or none; DeviceBusy names the ones taken."""
        devices = list(dict.fromkeys(devices))
        with self._lock:
            taken = [f"{d} ({self._busy[d]})" for d in devices if d in self._busy]
            if taken:
                raise DeviceBusy(f"a deployment is already running on {', '.join(taken)}: wait for it to end")
            for dev in devices:
                self._busy[dev] = what

    def release(self, devices: Iterable[str]) -> None:
        with self._lock:
            for dev in devices:
                self._busy.pop(dev, None)

    def get(self, job_id: str) -> Optional[Job]:
        with self._lock:
            return self._jobs.get(job_id)

    def docs(self) -> List[Dict[str, Any]]:
        with self._lock:
            jobs = list(self._jobs.values())
        return [j.doc() for j in jobs]

    # -- the four commands -----------------------------------------------------------------------
    def bench(self, devices: List[str], runs: int, warmup: int = 1, pipeline: bool = False,
              pause: bool = False, model: Optional[str] = None, timeout: float = 300.0) -> Job:
        params = fleet_bench.command_params(runs, warmup, pipeline, pause, model=model or None)

        def work(client: FleetClient, job: Job) -> None:
            job.report = fleet_bench.run(client, params, devices=devices, timeout=timeout,
                                         on_message=self._progress(job))
            job.table = table(fleet_bench.summary_rows(job.report), fleet_bench.TABLE_COLUMNS)
        return self._start("bench", devices, params, work)

    def models(self, devices: List[str], timeout: float = 20.0) -> Job:
        def work(client: FleetClient, job: Job) -> None:
            answers = fleet_deploy.list_models(client, devices=devices, timeout=timeout)
            job.table = table(fleet_deploy.model_rows(answers), fleet_deploy.MODEL_COLUMNS)
            for dev, answer in answers.items():
                job.set_progress(dev, {"status": answer.status, "reason": answer.reason})
        return self._start("models", devices, {}, work)

    def deploy(self, devices: List[str], model: Path, name: str, labels: Optional[List[str]] = None,
               confirm_frames: Optional[int] = None, timeout: float = 300.0, reserved: bool = False) -> Job:
        """Deploy the model file ``model`` (removed when the job ends). ``reserved``: the caller
        already holds the devices (:meth:`reserve`); they are released when the job ends."""
        def work(client: FleetClient, job: Job) -> None:
            data = Path(model).read_bytes()
            params = fleet_deploy.deploy_params(data, name, labels=labels, sign_key=self.sign_key,
                                                confirm_frames=confirm_frames)
            job.params = {k: v for k, v in params.items() if k not in ("signature", "labels")}
            self.on_change(job.id)
            answers = fleet_deploy.deploy(client, params, data, devices=devices, timeout=timeout,
                                          on_message=self._progress(job))
            job.table = table(fleet_deploy.deploy_rows(answers), fleet_deploy.DEPLOY_COLUMNS)
            self._finals(job, answers)

        with self._lock:
            self._files.add(str(model))

        def cleanup() -> None:
            with self._lock:
                self._files.discard(str(model))
            with contextlib.suppress(OSError):
                os.unlink(model)
        return self._start("deploy", devices, {"name": name}, work, cleanup=cleanup, reserved=reserved)

    def rollback(self, devices: List[str], to: Optional[str] = None, timeout: float = 120.0) -> Job:
        def work(client: FleetClient, job: Job) -> None:
            answers = fleet_deploy.rollback(client, to or None, devices=devices, timeout=timeout,
                                            on_message=self._progress(job))
            job.table = table(fleet_deploy.deploy_rows(answers), fleet_deploy.DEPLOY_COLUMNS)
            self._finals(job, answers)
        return self._start("rollback", devices, {"to": to} if to else {}, work, reserved=False, exclusive=True)

    # -- plumbing --------------------------------------------------------------------------------
    def _progress(self, job: Job) -> Callable[[str, Dict[str, Any]], None]:
        def on_message(device: str, doc: Dict[str, Any]) -> None:
            job.set_progress(device, _progress_entry(doc))
            self.on_change(job.id)
        return on_message

    @staticmethod
    def _finals(job: Job, answers: Dict[str, Any]) -> None:
        for dev, answer in answers.items():  # offline/timeout never arrive as messages
            entry = dict(job.progress.get(dev) or {})
            entry.update({"status": answer.status, "reason": answer.reason,
                          "state": (answer.final or {}).get("state")})
            job.set_progress(dev, entry)

    def _start(self, kind: str, devices: List[str], params: Dict[str, Any],
               work: Callable[[FleetClient, Job], None], cleanup: Optional[Callable[[], None]] = None,
               reserved: bool = False, exclusive: bool = False) -> Job:
        """``reserved``/``exclusive``: the devices are held (by the caller / claimed here) until the
        job ends; ``cleanup`` runs when it ends (also when it cannot start)."""
        try:
            if not devices:
                raise EdgeAgentError("choose at least one device")
            job = Job(f"{kind}-{next(self._ids)}", kind, list(dict.fromkeys(devices)), params)
            if exclusive:
                self.reserve(job.devices, job.id)
        except BaseException:
            if cleanup is not None:
                cleanup()
            if reserved:
                self.release(devices)
            raise
        if reserved or exclusive:
            with self._lock:
                self._busy.update({dev: job.id for dev in job.devices})
            done = cleanup

            def cleanup() -> None:
                try:
                    if done is not None:
                        done()
                finally:
                    self.release(job.devices)
        with self._lock:
            self._jobs[job.id] = job
            for old in list(self._jobs)[:-KEEP_JOBS]:
                if self._jobs[old].status != "running":
                    del self._jobs[old]
        threading.Thread(target=self._run, args=(job, work, cleanup), name=f"console-{job.id}", daemon=True).start()
        self.on_change(job.id)
        return job

    def _run(self, job: Job, work: Callable[[FleetClient, Job], None],
             cleanup: Optional[Callable[[], None]] = None) -> None:
        try:
            try:
                with FleetClient(self.mqtt) as client:
                    client.discover(self.discover_s)
                    work(client, job)
            finally:  # before the job says it ended: the page may deploy again at once
                if cleanup is not None:
                    cleanup()
            job.status = "done"
        except EdgeAgentError as exc:
            job.status, job.error = "failed", str(exc)
        except Exception as exc:  # the console keeps serving; the page shows why
            log.exception("console job %s failed", job.id)
            job.status, job.error = "failed", f"{type(exc).__name__}: {exc}"
        job.finished_at = time.time()
        self.on_change(job.id)

