"""Staged rollouts: one model to a set of devices in stages, each stage judged by what its devices
report after the swap compared with before, and rolled back by itself when a gate fails.

Why: ``remote deploy --all`` reaches every device at once; a model that is fine on the bench but
slow or failing on half the cameras then breaks all of them together. Like AWS IoT Jobs' rollout
rate and abort criteria or Mender's phased deployments, a rollout goes stage by stage; unlike them
it can judge a *model* on the device, because every agent already reports fps and per-stage
latency (``timings``) and its status (``info``).

A stage: note each device's running model (its rollback target) and its recent metrics
(baseline), deploy, let it run for the soak time, then check the gates per device:

* the deployment ended ``done`` (not failed/rejected/timeout) and the device is not in ``error``;
* fps after >= ``fps_ratio`` x before (default 0.8);
* inference p50 after <= ``p50_ratio`` x before (default 1.2).

A failed gate stops the rollout and rolls back every device of the stages done so far (this one
included) to the model it ran before, with a report of which device failed which gate and by how
much. The state (stages, devices, previous models, gate results, status) is written to a JSON
file after every step: ``--resume`` continues a rollout that was interrupted (stages that passed
are not redone); Ctrl-C (or :meth:`Rollout.cancel`: the console's Cancel) cancels it and rolls
back the devices it had changed, so every device ends on a known model.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from edge_agent.errors import EdgeAgentError
from edge_agent.fleet.client import Answer, FleetClient, json_object
from edge_agent.fleet.deploy import deploy, rollback

STATE_VERSION = 1


class RolloutError(EdgeAgentError):
    """A rollout cannot start or continue (bad stages, nothing to roll out, a state file that does not fit)."""


class Cancelled(Exception):
    """:meth:`Rollout.cancel` was called: taken like Ctrl-C (roll back what was changed)."""


@dataclass
class Gates:
    """What each device of a stage must show after the swap, against its own baseline."""

    fps_ratio: Optional[float] = 0.8  # fps after >= this x before (None: not checked)
    p50_ratio: Optional[float] = 1.2  # inference p50 after <= this x before (None: not checked)


def parse_stages(text: str, total: int) -> List[int]:
    """"1,10,50%,100%" -> cumulative device counts of each stage, for ``total`` devices.

    A plain number is how many devices have the model once the stage is done; ``N%`` is that share
    of the devices (rounded up). Counts must grow, and the last stage must reach every device; a
    stage that adds no device for this fleet's size (``10`` of 3 devices after ``100%``) is merged."""
    if total < 1:
        raise RolloutError("no device to roll out to")
    counts: List[int] = []
    last_raw: Dict[bool, float] = {}  # percent? -> the last number of that kind
    for part in (p.strip() for p in text.split(",")):
        percent = part.endswith("%")
        try:
            raw = float(part[:-1]) if percent else float(int(part))
        except ValueError:
            raise RolloutError(f"--stages: {part!r} is neither a device count nor a percentage") from None
        asked = total * raw / 100 if percent else raw
        if raw <= 0 or raw <= last_raw.get(percent, 0.0):
            raise RolloutError(f"--stages {text!r}: every stage must add devices ({part!r} adds none)")
        last_raw[percent] = raw
        n = min(math.ceil(asked), total)
        if not counts or n > counts[-1]:
            counts.append(n)
    if counts[-1] != total:
        raise RolloutError(f"--stages {text!r}: the last stage covers {counts[-1]} of {total} devices; "
                           "end with 100%")
    return counts


class Metrics:
    """fps and inference p50 per device from their ``timings`` (interval) and ``stats`` messages."""

    def __init__(self, client: FleetClient, devices: Sequence[str], clock: Callable[[], float] = time.monotonic):
        self._clock = clock
        self._lock = threading.Lock()
        self._samples: Dict[str, List[Tuple[float, str, float]]] = {d: [] for d in devices}
        prefix = client.prefix
        filters = [f"{prefix}/{d}/{what}" for d in devices for what in ("timings", "stats")]
        client.listen(filters, self._on_message)

    def _on_message(self, topic: str, payload: bytes) -> None:
        parts = topic.split("/")
        device, what = parts[-2], parts[-1]
        doc = json_object(payload)
        if doc is None:
            return
        now = self._clock()
        found: List[Tuple[str, float]] = []
        if isinstance(doc.get("fps"), (int, float)) and what == "timings":
            found.append(("fps", float(doc["fps"])))
        if what == "stats" and isinstance(doc.get("fps"), (int, float)) and not doc.get("paused"):
            found.append(("fps", float(doc["fps"])))
        inference = (doc.get("stages") or {}).get("inference") if what == "timings" else None
        if isinstance(inference, dict) and isinstance(inference.get("p50"), (int, float)):
            found.append(("p50_ms", float(inference["p50"])))
        with self._lock:
            if device in self._samples:
                self._samples[device].extend((now, k, v) for k, v in found)

    def window(self, device: str, since: float, until: Optional[float] = None) -> Dict[str, Any]:
        """Medians of the samples of ``device`` in [since, until]: {"fps", "p50_ms", "samples"}."""
        until = self._clock() if until is None else until
        with self._lock:
            picked = [(k, v) for t, k, v in self._samples.get(device, []) if since <= t <= until]
        out: Dict[str, Any] = {"samples": len(picked)}
        for key in ("fps", "p50_ms"):
            values = [v for k, v in picked if k == key]
            out[key] = round(statistics.median(values), 3) if values else None
        return out

    def wait_for_samples(self, devices: Sequence[str], since: float, timeout: float,
                         stop: Optional[threading.Event] = None) -> None:
        """Until every device has at least one fps sample after ``since`` (or ``timeout``, or ``stop``)."""
        deadline = self._clock() + timeout
        while self._clock() < deadline and not (stop is not None and stop.is_set()):
            if all(self.window(d, since)["fps"] is not None for d in devices):
                return
            time.sleep(0.1)


@dataclass
class Stage:
    devices: List[str]
    status: str = "pending"  # pending | deploying | soaking | passed | failed
    previous: Dict[str, Optional[str]] = field(default_factory=dict)  # device -> sha256 it ran before
    results: Dict[str, Dict[str, Any]] = field(default_factory=dict)  # device -> gate results


@dataclass
class RolloutState:
    model: Dict[str, Any]
    devices: List[str]
    stages: List[Stage]
    gates: Dict[str, Any]
    soak_s: float
    status: str = "running"  # running | done | failed | cancelled
    report: List[str] = field(default_factory=list)
    rolled_back: Dict[str, str] = field(default_factory=dict)  # device -> outcome of its rollback
    updated_at: float = 0.0

    def save(self, path: Path) -> None:
        self.updated_at = time.time()
        doc = {"version": STATE_VERSION, **asdict(self)}
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(doc, indent=2) + "\n")
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: Path) -> "RolloutState":
        try:
            doc = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise RolloutError(f"--resume {path}: cannot read the rollout state ({exc})") from None
        if doc.get("version") != STATE_VERSION:
            raise RolloutError(f"--resume {path}: not a rollout state of this version")
        doc.pop("version")
        doc["stages"] = [Stage(**s) for s in doc["stages"]]
        return cls(**doc)


def check_gates(gates: Gates, before: Dict[str, Any], after: Dict[str, Any], answer: Optional[Answer],
                status: Optional[str]) -> Dict[str, Any]:
    """One device's gate results: {"ok": bool, "failed": [one line per failed gate], metrics}."""
    failed: List[str] = []
    if answer is None or not answer.ok:
        why = answer.reason if answer is not None else "no answer"
        failed.append(f"deploy: {answer.status if answer else 'none'} ({why})")
    if status == "error":
        failed.append("status: the device reports an error after the swap")
    if gates.fps_ratio is not None:
        b, a = before.get("fps"), after.get("fps")
        if b and a is not None and a < gates.fps_ratio * b:
            failed.append(f"fps: {a:g} after vs {b:g} before = {a / b:.2f}x < {gates.fps_ratio:g}x")
        elif b and a is None:
            failed.append("fps: no report after the swap")
    if gates.p50_ratio is not None:
        b, a = before.get("p50_ms"), after.get("p50_ms")
        if b and a is not None and a > gates.p50_ratio * b:
            failed.append(f"p50: {a:g} ms after vs {b:g} ms before = {a / b:.2f}x > {gates.p50_ratio:g}x")
    return {"ok": not failed, "failed": failed, "before": before, "after": after}


class Rollout:
    """Runs (or resumes) one rollout; :meth:`run` returns 0 when every stage passed."""

    def __init__(self, client: FleetClient, state: RolloutState, state_path: Path, params: Dict[str, Any],
                 data: Optional[bytes], baseline_s: float = 10.0, deploy_timeout_s: float = 300.0,
                 out: Callable[[str], None] = print) -> None:
        self.client, self.state, self.path = client, state, state_path
        self.params, self.data = params, data
        self.gates = Gates(**state.gates)
        self.baseline_s, self.deploy_timeout_s = baseline_s, deploy_timeout_s
        self.out = out
        self.metrics = Metrics(client, state.devices)
        self._started = time.monotonic()
        self._cancel = threading.Event()

    def cancel(self) -> None:
        """From any thread: stop at the next step (a running deployment is waited for) and roll
        back the devices changed so far, as Ctrl-C does."""
        self._cancel.set()

    def _sleep(self, seconds: float) -> None:
        if self._cancel.wait(max(0.0, seconds)):
            raise Cancelled

    @classmethod
    def plan(cls, devices: Sequence[str], stages: str, params: Dict[str, Any], gates: Gates,
             soak_s: float) -> RolloutState:
        counts = parse_stages(stages, len(devices))
        ordered = sorted(devices)
        groups = [ordered[a:b] for a, b in zip([0, *counts[:-1]], counts)]
        model = {k: params[k] for k in ("name", "sha256", "size")}
        return RolloutState(model, ordered, [Stage(g) for g in groups], asdict(gates), soak_s)

    def _running_sha(self, device: str) -> Optional[str]:
        info = self.client.devices().get(device)
        model = ((info.info or {}).get("model") or {}) if info else {}
        return model.get("sha256")

    def _status(self, device: str) -> Optional[str]:
        info = self.client.devices().get(device)
        if info is None or info.online is False:
            return "error"
        return (info.info or {}).get("status")

    def run(self) -> int:
        st = self.state
        if st.status != "running":
            raise RolloutError(f"this rollout is {st.status}: nothing to resume")
        try:
            # A baseline needs metrics from before the first swap: listen for baseline_s first.
            self.metrics.wait_for_samples(st.devices, self._started, timeout=self.baseline_s * 3, stop=self._cancel)
            self._sleep(self.baseline_s - (time.monotonic() - self._started))
            for index, stage in enumerate(st.stages):
                if stage.status == "passed":
                    continue
                self._sleep(0)
                if not self._run_stage(index, stage):
                    self._roll_back(index)
                    st.status = "failed"
                    st.save(self.path)
                    for line in st.report:
                        self.out(line)
                    return 1
            st.status = "done"
            st.report.append(f"done: {st.model['name']} runs on {len(st.devices)} device(s) "
                             f"in {len(st.stages)} stage(s)")
            st.save(self.path)
            self.out(st.report[-1])
            return 0
        except (KeyboardInterrupt, Cancelled):
            done = max((i for i, s in enumerate(st.stages) if s.status != "pending"), default=-1)
            st.report.append("cancelled: rolling back the devices this rollout changed")
            self.out(st.report[-1])
            self._roll_back(done)
            st.status = "cancelled"
            st.save(self.path)
            return 130

    def _run_stage(self, index: int, stage: Stage) -> bool:
        st, n = self.state, len(self.state.stages)
        if not stage.previous:  # resumed mid-stage: keep what they ran before this rollout touched them
            stage.previous = {d: self._running_sha(d) for d in stage.devices}
        before_until = time.monotonic()
        before = {d: self.metrics.window(d, before_until - self.baseline_s, before_until) for d in stage.devices}
        stage.status = "deploying"
        st.save(self.path)
        self.out(f"stage {index + 1}/{n}: deploying {st.model['name']} to {', '.join(stage.devices)}")
        answers = deploy(self.client, self.params, self.data, devices=stage.devices,
                         timeout=self.deploy_timeout_s)
        swapped = time.monotonic()
        stage.status = "soaking"
        st.save(self.path)
        self._sleep(0)
        ok_devices = [d for d in stage.devices if answers.get(d) is not None and answers[d].ok]
        if ok_devices:
            self.out(f"stage {index + 1}/{n}: soaking {st.soak_s:g} s")
            self._sleep(st.soak_s)
        for d in stage.devices:
            after = self.metrics.window(d, swapped)
            stage.results[d] = check_gates(self.gates, before[d], after, answers.get(d), self._status(d))
        stage.status = "passed" if all(r["ok"] for r in stage.results.values()) else "failed"
        st.save(self.path)
        if stage.status == "failed":
            for d, r in stage.results.items():
                for line in r["failed"]:
                    st.report.append(f"stage {index + 1}/{n}: {d} failed {line}")
            return False
        self.out(f"stage {index + 1}/{n}: passed (" + "; ".join(
            f"{d}: fps {r['before']['fps']}->{r['after']['fps']}, p50 {r['before']['p50_ms']}->"
            f"{r['after']['p50_ms']} ms" for d, r in stage.results.items()) + ")")
        return True

    def _roll_back(self, last_index: int) -> None:
        """Every device of stages 0..last_index back to the model it ran before this rollout."""
        st = self.state
        targets: Dict[str, Optional[str]] = {}
        for stage in st.stages[:last_index + 1]:
            targets.update(stage.previous)
        by_sha: Dict[Optional[str], List[str]] = {}
        for device, sha in targets.items():
            if sha != st.model["sha256"]:  # a device that already ran the new model stays on it
                by_sha.setdefault(sha, []).append(device)
        for sha, devices in by_sha.items():
            answers = rollback(self.client, sha, devices=sorted(devices), timeout=self.deploy_timeout_s)
            for device, answer in answers.items():
                st.rolled_back[device] = "done" if answer.ok else f"{answer.status}: {answer.reason}"
        if st.rolled_back:
            st.report.append("rolled back: " + ", ".join(f"{d} ({o})" for d, o in sorted(st.rolled_back.items())))
        st.save(self.path)
