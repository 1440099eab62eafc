"""``edge-agent remote deploy|rollback|models``: ship a model to devices through the broker.

The host hashes (and optionally signs) the file, sends ``cmd/deploy`` to each device or to the
fleet topic and, for inline transfers, publishes the chunks only once a device answered
``accepted`` (a refused deployment costs no transfer; fleet-wide: once, to the fleet's chunk
topic, after every expected device accepted or ``ACCEPT_GRACE_S`` passed).  It then waits for
one final answer per device and prints a table.  Protocol: :mod:`edge_agent.remote.deploy`.
"""

from __future__ import annotations

import base64
import hashlib
import math
import queue
import threading
import time
from typing import Any, Dict, Iterable, List, Optional, Sequence, Set, TextIO

from edge_agent.errors import EdgeAgentError
from edge_agent.fleet.client import Answer, FleetClient, new_request_id
from edge_agent.fleet.table import format_table

DEFAULT_CHUNK_SIZE = 256 * 1024
ACCEPT_GRACE_S = 3.0  # fleet: how long to wait for more devices to accept before sending chunks
COMMAND = "deploy"
DEPLOY_COLUMNS = ("device", "status", "state", "model", "sha256", "running")
MODEL_COLUMNS = ("device", "status", "role", "name", "sha256", "size", "deployed")


def deploy_params(data: bytes, name: str, labels: Optional[List[str]] = None, url: Optional[str] = None,
                  chunk_size: int = DEFAULT_CHUNK_SIZE, sign_key: Any = None,
                  sample: Optional[bytes] = None, golden_mask: Optional[bytes] = None,
                  **extra: Any) -> Dict[str, Any]:
    """The ``cmd/deploy`` document (without request_id) for the model bytes ``data``."""
    if chunk_size <= 0:
        raise EdgeAgentError("--chunk-size must be positive")
    sha = hashlib.sha256(data).hexdigest()
    params: Dict[str, Any] = {"name": name, "sha256": sha, "size": len(data)}
    if labels is not None:
        params["labels"] = labels
    if url:
        params["url"] = url
    else:
        params["chunks"] = max(1, math.ceil(len(data) / chunk_size))
        params["chunk_size"] = chunk_size
    if sign_key is not None:  # the deployment is signed: the bytes, name, labels, sample and golden mask
        from edge_agent.models import signing

        params["signature"] = signing.sign_deployment(
            sign_key, signing.deployment_document(sha, name, labels, sample, golden_mask))
    if sample is not None:
        params["sample"] = base64.b64encode(sample).decode("ascii")
    if golden_mask is not None:
        params["golden_mask"] = base64.b64encode(golden_mask).decode("ascii")
    params.update({k: v for k, v in extra.items() if v is not None})
    return params


def chunks_of(data: bytes, chunk_size: int) -> List[bytes]:
    return [data[i:i + chunk_size] for i in range(0, len(data), chunk_size)] or [b""]


def chunk_topic(prefix: str, target: str, request_id: str, n: int) -> str:
    """Where chunk ``n`` (0-based) of an inline transfer goes; ``target``: a device id or ``all``."""
    return f"{prefix}/{target}/cmd/{COMMAND}/{request_id}/chunk/{n}"


class ChunkSender:
    """Publishes the chunks to each device that accepted (fleet mode: once, to the fleet topic).

    ``on_message`` runs on paho's thread (under the client's lock): it only queues work; a
    thread of its own publishes.
    """

    def __init__(self, client: FleetClient, request_id: str, chunks: Sequence[bytes], fleet: bool,
                 expected: Iterable[str] = ()) -> None:
        self.client, self.rid, self.chunks, self.fleet = client, request_id, chunks, fleet
        self.expected: Set[str] = set(expected)
        self.accepted: Set[str] = set()
        self._queue: "queue.Queue[Optional[str]]" = queue.Queue()
        self._first_accept: Optional[float] = None
        self._fleet_sent = False
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="deploy-chunks", daemon=True)
        self._thread.start()
        self.errors: List[str] = []

    def on_message(self, device: str, doc: Dict[str, Any]) -> None:
        status = doc.get("status")
        with self._lock:
            if status == "accepted" and device not in self.accepted:
                self.accepted.add(device)
                self._first_accept = self._first_accept or time.monotonic()
                if not self.fleet:
                    self._queue.put(device)
            elif status in ("rejected", "failed", "done"):
                self.expected.discard(device)

    def _fleet_ready(self) -> bool:
        with self._lock:
            if self._fleet_sent or self._first_accept is None:
                return False
            return self.expected <= self.accepted or time.monotonic() - self._first_accept >= ACCEPT_GRACE_S

    def _run(self) -> None:
        while True:
            if self.fleet:
                if self._fleet_ready():
                    self._fleet_sent = True
                    self._send("all")
                try:
                    if self._queue.get(timeout=0.05) is None:
                        return
                except queue.Empty:
                    continue
            else:
                target = self._queue.get()
                if target is None:
                    return
                self._send(target)

    def _send(self, target: str) -> None:
        try:
            for n, chunk in enumerate(self.chunks):
                # waits for the broker's PUBACK
                self.client.publish(chunk_topic(self.client.prefix, target, self.rid, n), chunk)
        except (RuntimeError, ValueError, OSError) as exc:
            self.errors.append(f"{target}: sending chunks failed ({exc})")

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(5)


def deploy(client: FleetClient, params: Dict[str, Any], data: Optional[bytes], devices: Optional[List[str]] = None,
           fleet: bool = False, timeout: float = 300.0, on_message: Any = None,
           request_id: Optional[str] = None) -> Dict[str, Answer]:
    """Send one deployment and wait for every device's final answer."""
    rid = request_id or new_request_id()
    sender = None
    if "chunks" in params:
        assert data is not None
        expected = client.online() if fleet else (devices or [])
        sender = ChunkSender(client, rid, chunks_of(data, params["chunk_size"]), fleet, expected)

    def relay(device: str, doc: Dict[str, Any]) -> None:
        if sender is not None:
            sender.on_message(device, doc)
        if on_message is not None:
            on_message(device, doc)

    try:
        return client.request(COMMAND, params, devices=None if fleet else devices, fleet=fleet,
                              timeout=timeout, request_id=rid, on_message=relay)
    finally:
        if sender is not None:
            sender.close()


def rollback(client: FleetClient, to: Optional[str] = None, devices: Optional[List[str]] = None,
             fleet: bool = False, timeout: float = 120.0, on_message: Any = None) -> Dict[str, Answer]:
    """Switch devices back to their previous model (or ``to``: a name/sha256 in their store)."""
    return client.request("rollback", {"to": to} if to else {}, devices=None if fleet else devices,
                          fleet=fleet, kind=COMMAND, timeout=timeout, on_message=on_message)


def list_models(client: FleetClient, devices: Optional[List[str]] = None, fleet: bool = False,
                timeout: float = 20.0) -> Dict[str, Answer]:
    """Each device's model store (``cmd/models``); :func:`model_rows` makes the table rows."""
    return client.request("models", {}, devices=None if fleet else devices, fleet=fleet, timeout=timeout)


# -- output ----------------------------------------------------------------------------------------

def _short(sha: Any) -> str:
    return sha[:12] if isinstance(sha, str) else "-"


def deploy_rows(answers: Dict[str, Answer]) -> List[Dict[str, Any]]:
    rows = []
    for dev, answer in answers.items():
        final = answer.final or {}
        rows.append({"device": dev, "status": answer.status, "state": final.get("state") or "-",
                     "model": final.get("name") or "-", "sha256": _short(final.get("sha256")),
                     "running": _short(final.get("running")), "reason": answer.reason})
    return rows


def model_rows(answers: Dict[str, Answer]) -> List[Dict[str, Any]]:
    rows = []
    for dev, answer in answers.items():
        final = answer.final or {}
        if answer.status != "done":
            rows.append({"device": dev, "status": answer.status, "reason": answer.reason})
            continue
        for m in final.get("models", []):
            when = time.strftime("%Y-%m-%d %H:%M", time.localtime(m["deployed_at"])) if m.get("deployed_at") else "-"
            role = m.get("role") or ("pending" if m.get("pending") else "")
            rows.append({"device": dev, "status": "done", "role": role, "name": m.get("name"),
                         "sha256": _short(m.get("sha256")), "size": m.get("size"), "deployed": when})
        if not final.get("models"):
            rows.append({"device": dev, "status": "done", "name": "(empty store)"})
    return rows


def report_deploy_answers(answers, out: TextIO) -> int:
    """The deploy/rollback table; exit 0 only when every device answered ``done``."""
    return _report(deploy_rows(answers), DEPLOY_COLUMNS, out)


def report_model_answers(answers: Dict[str, Answer], out: TextIO) -> int:
    """The ``models`` table (one row per stored model); exit 0 only when every device answered ``done``."""
    return _report(model_rows(answers), MODEL_COLUMNS, out)


def _report(rows: List[Dict[str, Any]], columns: Sequence[str], out: TextIO) -> int:
    print(format_table(rows, columns) if rows else "no device answered", file=out)
    return 0 if rows and all(r["status"] == "done" for r in rows) else 1
