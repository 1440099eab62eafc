"""Agent-side plumbing shared by every MQTT command (``cmd/benchmark``, ``cmd/deploy``, ...).

A command module builds one :class:`CommandChannel` with a :data:`Schema` and hands it the raw
MQTT messages; the channel parses and validates them, refuses bad ones itself, and returns a
:class:`Request` for the command to accept/run/finish. Why it is strict:

* Commands arrive from the network. Anything not exactly as documented is refused with a
  precise one-line reason (``runs: expected an integer 1..1000, got 100000``) instead of being
  guessed at: unknown fields, wrong types (``true`` is not an integer, ``1.0`` is not an
  integer), out-of-range or non-finite numbers, duplicate JSON keys, payloads over
  ``max_bytes``, invalid UTF-8, nesting deeper than Python's recursion limit.
* Every request gets exactly ONE final answer. MQTT QoS 1 delivers at least once, so a request id
  seen before (on this device, within the last ``remember`` ids) is a retransmission: it is never
  run twice and never answered a second time on the request's topic (see :meth:`receive`). The
  window is a count, in memory (documented in the protocol; not persisted): its memory is bounded
  whatever a flood of requests does, and requesters use a new id per request.

Wire protocol (documented in docs/asyncapi.yaml):

* Request: a JSON object on ``<prefix>/<device>/cmd/<name>`` or ``<prefix>/all/cmd/<name>`` with
  ``request_id`` (``[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}``) and the command's own fields.
* Answers: JSON objects on ``<prefix>/<device>/<kind>/<request_id>`` (QoS 1, not retained) and,
  when the request carried an MQTT 5 response topic the agent may publish to (its own
  ``<prefix>/<device>/<kind>/...`` or ``mqtt.response_topic_prefixes``, never ``$``: see
  :func:`response_topic_refusal`), also on that topic with the correlation data echoed. Each
  answer has ``request_id``, ``device_id``, ``kind``, ``status``, ``final``, ``ts``.
  Statuses: ``accepted``, ``progress`` (not final); ``done``, ``rejected``, ``failed`` (final).
* A request without a usable id (not UTF-8, not JSON, not an object, bad ``request_id``) is
  answered ``rejected`` with ``request_id: null`` on ``<prefix>/<device>/<kind>/_invalid``
  (``_`` cannot start a request id, so this never collides) and on its response topic.

Answers go through one outbox thread per channel: ``accepted`` and final answers are retried
while the broker is away (for ``REPLY_RETRY_S``), progress is best effort, order is kept.
"""

from __future__ import annotations

import collections
import json
import logging
import re
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Deque, Dict, Mapping, Optional, Sequence, Tuple

from edge_agent.config import mask_url_secrets
from edge_agent.output.throttle import Throttle
from edge_agent.schema import Bool, Choice, Field, Float, Int, Invalid, Str, range_text

log = logging.getLogger(__name__)

REQUEST_ID_PATTERN = r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}"
_REQUEST_ID = re.compile(REQUEST_ID_PATTERN)
INVALID_ID_TOPIC = "_invalid"
DEFAULT_MAX_BYTES = 16 * 1024
DEFAULT_REMEMBER = 1024
REPLY_RETRY_S = 30.0
MAX_INT_DIGITS = 18
OUTBOX_LIMIT = 10000
REFUSAL_LOG_S = 60.0  # refused response topics: one WARNING line per minute, the rest at DEBUG

# An absolute local path in a reason (not the path of a URL: those follow a host name or a port).
_LOCAL_PATH = re.compile(r"""(?<![\w:/.~%-])/[^\s/'"(),:;]+(?:/[^\s/'"(),:;]*)*""")
_QUOTED_LOCAL_PATH = re.compile(r"""(['"])/[^'"\n]*\1""")  # OSError's quoted filename, spaces and all
LOCAL_PATH_SHOWN = "<local path>"

FINAL_STATUSES = ("done", "rejected", "failed")
STATUSES = ("accepted", "progress") + FINAL_STATUSES


class RequestError(ValueError):
    """A request refused for a reason the sender can read (one line)."""


def public_reason(text: str) -> str:
    """A reason as it may go over MQTT: URL passwords masked, local paths (the device's file
    layout: ``/var/lib/edge-agent/models/.incoming-x.part``) replaced by ``<local path>``, one line.
    Every ``reason`` of every answer goes through it (:meth:`Request.send`); logs keep the details."""
    text = mask_url_secrets(str(text))
    text = _QUOTED_LOCAL_PATH.sub(lambda m: f"{m.group(1)}{LOCAL_PATH_SHOWN}{m.group(1)}", text)
    text = _LOCAL_PATH.sub(LOCAL_PATH_SHOWN, text)
    return " ".join(text.split())


def _show(value: Any) -> str:
    """A short representation of an offending value for a rejection reason."""
    try:
        text = json.dumps(value, default=str)
    except (RecursionError, ValueError):
        return type(value).__name__ + " (...)"
    return text if len(text) <= 40 else text[:37] + "..."


# --------------------------------------------------------------------------- schema fields
# The fields are edge_agent.schema's (shared with the config); only the wording is the wire's.

FieldSpec = Field
StrField = Str


class IntField(Int):
    def __init__(self, lo: int, hi: int, **kwargs: Any) -> None:
        super().__init__(lo, hi, **kwargs)
        self.expected = "an integer" + range_text(lo, hi)


class FloatField(Float):
    def __init__(self, lo: float, hi: float, **kwargs: Any) -> None:
        super().__init__(lo, hi, **kwargs)
        self.expected = "a number" + range_text(lo, hi, "g")


class BoolField(Bool):
    expected = "true or false"


class ChoiceField(Choice):
    def __init__(self, choices: Sequence[str], **kwargs: Any) -> None:
        super().__init__(*choices, **kwargs)


Schema = Mapping[str, FieldSpec]


# --------------------------------------------------------------------------- parsing


_DUPLICATE = "\x00duplicate-key"  # marks an object that repeated a key (a JSON key can't be this)


class TooLarge:
    """A JSON integer with too many digits: kept as a marker so the field check names it."""

    def __init__(self, text: str) -> None:
        self.text = text

    def __str__(self) -> str:
        return f"{self.text[:12]}... ({len(self.text)} digits)"


def _mark_duplicate_keys(pairs: Sequence[Tuple[str, Any]]) -> Dict[str, Any]:
    """Build the object; a repeated key is remembered (and refused later, with the request id)."""
    out: Dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            out.setdefault(_DUPLICATE, key)
        out[key] = value
    return out


def _bounded_int(text: str) -> Any:
    # Python refuses int() of > 4300 digits with ValueError, which would fail the whole document.
    return TooLarge(text) if len(text.lstrip("-")) > MAX_INT_DIGITS else int(text)


def decode_json(payload: bytes, max_bytes: int = DEFAULT_MAX_BYTES) -> Any:
    """Parse a command payload; RequestError with the reason when it is not acceptable JSON."""
    if len(payload) > max_bytes:
        raise RequestError(f"payload too large: {len(payload)} bytes (max {max_bytes})")
    if not payload.strip():
        raise RequestError("empty payload: expected a JSON object")
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RequestError(f"payload is not UTF-8 (invalid byte at offset {exc.start})") from None
    try:
        # NaN/Infinity/1e999 parse to non-finite floats, which every number field refuses.
        return json.loads(text, object_pairs_hook=_mark_duplicate_keys, parse_int=_bounded_int)
    except RecursionError:
        raise RequestError("JSON nested too deeply") from None
    except json.JSONDecodeError as exc:
        raise RequestError(f"not JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") from None
    except RequestError:
        raise
    except ValueError as exc:  # e.g. int conversion limits
        raise RequestError(f"not acceptable JSON: {exc}") from None


def request_id_of(doc: Any) -> Optional[str]:
    """The request id of a parsed document when it has a valid one, else None."""
    if isinstance(doc, dict) and doc.get(_DUPLICATE) != "request_id":
        rid = doc.get("request_id")
        if isinstance(rid, str) and _REQUEST_ID.fullmatch(rid):
            return rid
    return None


def validate(doc: Any, schema: Schema) -> Dict[str, Any]:
    """Check a parsed request against ``schema``; returns every field (defaults filled in).

    ``request_id`` is checked by the channel and is not part of ``schema``.
    """
    if not isinstance(doc, dict):
        raise RequestError(f"expected a JSON object, got {type(doc).__name__}")
    if _DUPLICATE in doc:
        raise RequestError(f"duplicate key {_show(doc[_DUPLICATE])}")
    unknown = sorted(k for k in doc if k != "request_id" and k not in schema)
    if unknown:
        known = ", ".join(["request_id", *schema])
        raise RequestError(f"unknown field(s) {', '.join(_show(k) for k in unknown[:5])} (known: {known})")
    params: Dict[str, Any] = {}
    for name, spec in schema.items():
        if name in doc:
            try:
                params[name] = spec.validate(name, doc[name], show=_show)
            except Invalid as exc:
                raise RequestError(str(exc)) from None
        elif spec.required:
            raise RequestError(f"{name}: missing (expected {spec.expected})")
        else:
            params[name] = spec.default
    return params


def schema_doc(schema: Schema) -> Dict[str, Dict[str, Any]]:
    """A plain description of a schema (for docs and error messages)."""
    return {name: {"expected": s.expected, "default": s.default, "required": s.required, "doc": s.doc}
            for name, s in schema.items()}


# --------------------------------------------------------------------------- answers


@dataclass
class _Outgoing:
    suffix: Optional[str]  # under <prefix>/<device>/; None: the response topic only
    response: Optional[Tuple[str, Optional[bytes]]]
    payload: bytes
    deadline: float  # monotonic; <= now means "one try only"


class Outbox:
    """Publishes answers in order from one thread; retries important ones while the broker is away.

    ``publish()`` of the comms never blocks and returns False when it dropped the message (broker
    away, too many in flight): a lost ``accepted`` or final answer would leave a client waiting
    until its timeout, so those are retried until ``REPLY_RETRY_S`` has passed.
    """

    def __init__(self, comms_getter: Callable[[], Any], name: str) -> None:
        self._comms = comms_getter
        self._queue: Deque[_Outgoing] = collections.deque()
        self._cond = threading.Condition()
        self._thread: Optional[threading.Thread] = None
        self._name = name
        self.dropped = 0

    def put(self, item: _Outgoing) -> None:
        with self._cond:
            if len(self._queue) >= OUTBOX_LIMIT:
                self.dropped += 1
                log.warning("%s: outbox full, answer dropped", self._name)
                return
            self._queue.append(item)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name=f"{self._name}-outbox", daemon=True)
                self._thread.start()
            self._cond.notify()

    def flush(self, timeout: float = 5.0) -> bool:
        """Wait until everything queued was published or given up (tests, shutdown)."""
        with self._cond:
            return self._cond.wait_for(lambda: not self._queue, timeout)

    def _run(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: bool(self._queue))
                item = self._queue[0]
            self._send(item)
            with self._cond:
                self._queue.popleft()
                self._cond.notify_all()

    def _send(self, item: _Outgoing) -> None:
        delay = 0.02
        sent_topic = item.suffix is None
        sent_response = False
        while True:
            comms = self._comms()
            try:
                sent_topic = sent_topic or comms.publish(item.suffix, item.payload, qos=1)
                if item.response is not None and not sent_response:
                    sent_response = comms.reply(item.response[0], item.payload, item.response[1])
                else:
                    sent_response = True
            except ValueError as exc:  # a topic the client library refuses: nothing to retry
                log.warning("%s: cannot answer on %s: %s", self._name, item.suffix, exc)
                return
            if sent_topic and sent_response:
                return
            if time.monotonic() >= item.deadline:
                self.dropped += 1
                log.warning("%s: answer on %s dropped (broker unavailable)", self._name, item.suffix)
                return
            time.sleep(delay)
            delay = min(delay * 2, 0.5)


def response_topic_refusal(topic: Any, own: Optional[str], allowed: Sequence[str]) -> Optional[str]:
    """Why the agent will not publish to this MQTT 5 response topic; None when it may.

    A request names its response topic itself, so it is honoured only inside the agent's own
    reply namespace ``own`` (``<prefix>/<device>/<kind>``: ``own/...``) or under a prefix of
    ``mqtt.response_topic_prefixes``; ``$`` topics never (brokers reserve them: mosquitto drops
    a client publishing there). Anything else would let any sender make the device publish onto
    another device's topics or get it disconnected.
    """
    if not isinstance(topic, str) or not topic:
        return "not a topic"
    if len(topic) > 512 or "+" in topic or "#" in topic or "\x00" in topic \
            or topic.startswith("/") or topic.endswith("/"):
        return "not a valid topic to publish to"
    if topic.startswith("$"):
        return "'$' topics are reserved for the broker"
    for prefix in ([own] if own else []) + list(allowed):
        if topic.startswith(prefix + "/"):
            return None
    return "outside the agent's reply namespace"


class Request:
    """One accepted-for-processing request: its parameters and its answers (one final, enforced)."""

    def __init__(self, channel: "CommandChannel", request_id: str, params: Dict[str, Any],
                 topic: str, response: Optional[Tuple[str, Optional[bytes]]]) -> None:
        self.channel = channel
        self.id = request_id
        self.params = params
        self.topic = topic
        self.fleet = channel.is_fleet_topic(topic)
        self.response = response
        self.received_at = time.time()
        self._final: Optional[str] = None
        self._lock = threading.Lock()

    @property
    def finished(self) -> bool:
        return self._final is not None

    @property
    def final_status(self) -> Optional[str]:
        return self._final

    def send(self, status: str, **fields: Any) -> bool:
        """Publish an answer; False (and nothing sent) if a final answer was already sent."""
        if status not in STATUSES:
            raise ValueError(f"unknown status {status!r}")
        if isinstance(fields.get("reason"), str):
            fields["reason"] = public_reason(fields["reason"])
        final = status in FINAL_STATUSES
        with self._lock:
            if self._final is not None:
                log.error("%s %s: %s after final %s ignored", self.channel.kind, self.id, status, self._final)
                return False
            if final:
                self._final = status
        self.channel.answer(self.id, status, fields, self.response)
        if final:
            self.channel.count(status)
        return True

    def accept(self, **fields: Any) -> bool:
        return self.send("accepted", **fields)

    def progress(self, **fields: Any) -> bool:
        return self.send("progress", **fields)

    def done(self, **fields: Any) -> bool:
        return self.send("done", **fields)

    def reject(self, reason: str, **fields: Any) -> bool:
        return self.send("rejected", reason=reason, **fields)

    def fail(self, reason: str, **fields: Any) -> bool:
        return self.send("failed", reason=reason, **fields)


@dataclass
class _Seen:
    response: Optional[Tuple[str, Optional[bytes]]]


class CommandChannel:
    """Parsing, id bookkeeping and answers for one command kind on one agent.

    ``comms_getter`` returns the agent's current comms (the agent may replace it on reload);
    ``kind`` names the answer topics (``<prefix>/<device>/<kind>/<request id>``). Commands that
    answer on the same topic pass ``share_ids_with`` so that one id memory covers them all.
    """

    def __init__(self, comms_getter: Callable[[], Any], kind: str, schema: Schema,
                 max_bytes: int = DEFAULT_MAX_BYTES, remember: int = DEFAULT_REMEMBER,
                 share_ids_with: Optional["CommandChannel"] = None) -> None:
        self._comms = comms_getter
        self.kind = kind
        self.schema = schema
        self.max_bytes = max_bytes
        self.remember = remember
        if share_ids_with is not None:
            if share_ids_with.kind != kind:
                raise ValueError("only channels answering on the same topic share request ids")
            self._seen = share_ids_with._seen
            self._lock = share_ids_with._lock
        else:
            self._seen: "collections.OrderedDict[str, _Seen]" = collections.OrderedDict()
            self._lock = threading.Lock()
        self.outbox = Outbox(comms_getter, f"cmd-{kind}")
        self.counters: Dict[str, int] = {"received": 0, "invalid": 0, "duplicates": 0,
                                         "accepted": 0, "done": 0, "rejected": 0, "failed": 0,
                                         "response_topic_refused": 0}
        self._refusal_log = Throttle(REFUSAL_LOG_S)

    # -- bookkeeping --------------------------------------------------------------------------
    def count(self, key: str) -> None:
        with self._lock:
            self.counters[key] = self.counters.get(key, 0) + 1

    def stats(self) -> Dict[str, int]:
        with self._lock:
            return dict(self.counters)

    def is_fleet_topic(self, topic: str) -> bool:
        comms = self._comms()
        fleet = getattr(comms, "fleet_topic", None)
        return bool(fleet) and topic.startswith(fleet("cmd") + "/")

    @property
    def device_id(self) -> Optional[str]:
        return getattr(self._comms(), "device_id", None)

    # -- receiving ----------------------------------------------------------------------------
    def receive(self, topic: str, payload: bytes, props: Optional[Mapping[str, Any]] = None) -> Optional[Request]:
        """Turn one MQTT message into a :class:`Request`, or answer/ignore it and return None.

        * Unparsable or without a valid ``request_id``: ``rejected`` on ``<kind>/_invalid``.
        * A request id already seen: a retransmission. Not run, not answered again on the
          request topic; if it came with a *different* MQTT 5 response topic/correlation data
          (another client reusing the id) that one gets ``rejected: duplicate request id``.
        * Fails the schema: ``rejected`` with the reason on ``<kind>/<request id>``.
        * Otherwise the caller gets the Request and must answer it (accept/reject, then one final).
        Safe to call on paho's network thread: it only parses and queues answers.
        """
        self.count("received")
        props = props or {}
        response: Optional[Tuple[str, Optional[bytes]]] = None
        rtopic = props.get("response_topic")
        if rtopic is not None:
            refused = self._refuse_response_topic(rtopic)
            if refused is None:
                cdata = props.get("correlation_data")
                response = (rtopic, bytes(cdata) if isinstance(cdata, (bytes, bytearray)) else None)
        try:
            doc = decode_json(payload, self.max_bytes)
        except RequestError as exc:
            self._reject_invalid(str(exc), response)
            return None
        rid = request_id_of(doc)
        if rid is None:
            if not isinstance(doc, dict):
                reason = f"expected a JSON object, got {type(doc).__name__}"
            elif "request_id" not in doc:
                reason = "request_id: missing"
            elif doc.get(_DUPLICATE) == "request_id":
                reason = "duplicate key \"request_id\""
            else:
                reason = f"request_id: expected a string matching {REQUEST_ID_PATTERN}, got {_show(doc['request_id'])}"
            self._reject_invalid(reason, response)
            return None
        with self._lock:
            seen = self._seen.get(rid)
            if seen is None:
                self._seen[rid] = _Seen(response)
                while len(self._seen) > self.remember:
                    self._seen.popitem(last=False)
        if seen is not None:
            self.count("duplicates")
            log.debug("%s %s: duplicate request id ignored", self.kind, rid)
            if response is not None and response != seen.response:
                self._send_to(None, response, self._doc(rid, "rejected", {"reason": "duplicate request id"}))
            return None
        try:
            params = validate(doc, self.schema)
        except RequestError as exc:
            request = Request(self, rid, {}, topic, response)
            request.reject(str(exc))
            return None
        return Request(self, rid, params, topic, response)

    def reply_namespace(self) -> Tuple[Optional[str], Tuple[str, ...]]:
        """The agent's own answer topics for this kind and the configured extra reply prefixes."""
        comms = self._comms()
        topic = getattr(comms, "topic", None)
        own = topic(self.kind) if callable(topic) else None
        allowed = getattr(getattr(comms, "cfg", None), "response_topic_prefixes", ()) or ()
        return own, tuple(allowed)

    def _refuse_response_topic(self, rtopic: Any) -> Optional[str]:
        """None if answers may go to ``rtopic``; else counted, logged (rate limited), the reason."""
        own, allowed = self.reply_namespace()
        refused = response_topic_refusal(rtopic, own, allowed)
        if refused is not None:
            self.count("response_topic_refused")
            level = logging.WARNING if self._refusal_log.ready() else logging.DEBUG
            log.log(level, "%s: response topic %s refused (%s): answered on %s/<request id> only; "
                    "allow a prefix with mqtt.response_topic_prefixes (%d refused so far)", self.kind,
                    _show(rtopic), refused, own, self.counters["response_topic_refused"])
        return refused

    def _reject_invalid(self, reason: str, response: Optional[Tuple[str, Optional[bytes]]]) -> None:
        self.count("invalid")
        self.count("rejected")
        log.debug("%s: invalid request rejected: %s", self.kind, reason)
        self._send_to(f"{self.kind}/{INVALID_ID_TOPIC}", response,
                      self._doc(None, "rejected", {"reason": reason}))

    # -- answering ----------------------------------------------------------------------------
    def _doc(self, rid: Optional[str], status: str, fields: Mapping[str, Any]) -> Dict[str, Any]:
        doc: Dict[str, Any] = {"request_id": rid, "device_id": self.device_id, "kind": self.kind,
                               "status": status, "final": status in FINAL_STATUSES,
                               "ts": round(time.time(), 3)}
        doc.update(fields)
        return doc

    def answer(self, rid: str, status: str, fields: Mapping[str, Any],
               response: Optional[Tuple[str, Optional[bytes]]]) -> None:
        if status == "accepted":
            self.count("accepted")
        self._send_to(f"{self.kind}/{rid}", response, self._doc(rid, status, fields))

    def _send_to(self, suffix: Optional[str], response: Optional[Tuple[str, Optional[bytes]]],
                 doc: Dict[str, Any]) -> None:
        payload = json.dumps(doc, separators=(",", ":"), allow_nan=False, default=str).encode()
        retry = doc["status"] != "progress"
        deadline = time.monotonic() + (REPLY_RETRY_S if retry else 0.0)
        if suffix is None and response is None:
            return
        self.outbox.put(_Outgoing(suffix, response, payload, deadline))
